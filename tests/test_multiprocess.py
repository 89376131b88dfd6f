import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def test_two_processes_end_with_identical_tokens(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(HERE / "two_process_train.py"),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    single = load_file(tmp_path / "rank0.safetensors")["soft_tokens.tokens"]
    assert not torch.equal(single, torch.zeros_like(single))


def test_cli_train_writes_config_checkpoint_and_adapter(tmp_path):
    from shapes_data import shapes_pairs

    from softalign.cli import main
    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, (image, caption) in enumerate(shapes_pairs(8)):
        image.save(data / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "{caption}"}}')
    (data / "metadata.jsonl").write_text("\n".join(lines))
    (tmp_path / "run.yaml").write_text("objective: softrepa\nmax_steps: 5\nresolution: 32\nsave_steps: 2\n")
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "run.yaml"),
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
        ]
    )
    assert code == 0
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "integrity.json").is_file()
    import json

    saved = json.loads((run / "softalign_config.json").read_text())
    assert saved["objective"] == "softrepa" and saved["max_steps"] == 2  # the flag overrides the file
    assert main(["train", "--model", str(tmp_path / "model"), "--data", str(data), "--train-batch-size", "3"]) == 2
