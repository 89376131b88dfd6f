import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two-process runs: `make test-all`

HERE = Path(__file__).resolve().parent


def torchrun(script: str | Path, port: str, *args: str) -> None:
    """Run a script (a name in tests/, or a path) on 2 CPU processes (gloo) and fail with its stderr when it fails."""
    # the checkout's own package first, so a worktree's tests run its code, not an installed copy
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    result = subprocess.run([*command, str(HERE / script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("family, port", [("sd15", "29533"), ("sd35", "29534"), ("flux", "29535")])
def test_two_processes_end_with_identical_tokens(family, port, tmp_path):
    torchrun("two_process_train.py", port, str(tmp_path), family)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    single = load_file(tmp_path / "rank0.safetensors")["soft_tokens.tokens"]
    assert not torch.equal(single, torch.zeros_like(single))


def _rl_ranks_identical(kind: str, port: str, tmp_path: Path, family: str = "sd15") -> None:
    """Train `kind` on 2 processes (two_process_rl.py); both ranks must hold the same, trained, parameters."""
    torchrun("two_process_rl.py", port, kind, str(tmp_path), family)
    initial = [load_file(tmp_path / f"{kind}-init-rank{r}.safetensors") for r in (0, 1)]
    final = [load_file(tmp_path / f"{kind}-rank{r}.safetensors") for r in (0, 1)]
    keys = set(final[0])
    assert keys == set(final[1]) == set(initial[0]) == set(initial[1])
    assert "soft_tokens.tokens" in keys and any(k.startswith("lora.") and "lora_B" in k for k in keys), sorted(keys)
    for name in sorted(keys):
        assert torch.equal(initial[0][name], initial[1][name]), f"{name} differs between ranks before training"
        assert torch.equal(final[0][name], final[1][name]), f"{name} differs between ranks after training"
    assert not torch.equal(final[0]["soft_tokens.tokens"], initial[0]["soft_tokens.tokens"])
    lora_b = [k for k in keys if k.startswith("lora.") and "lora_B" in k]
    assert all(not torch.equal(final[0][k], initial[0][k]) for k in lora_b), "a LoRA B matrix did not train"


@pytest.mark.parametrize("family, port", [("sd15", "29541"), ("sd35", "29543"), ("flux", "29544")])
def test_two_process_ddpo_ranks_identical(family, port, tmp_path):
    _rl_ranks_identical("ddpo", port, tmp_path, family)


@pytest.mark.parametrize("family, port", [("sd15", "29542"), ("sd35", "29545"), ("flux", "29546")])
def test_two_process_diffusion_dpo_ranks_identical(family, port, tmp_path):
    _rl_ranks_identical("dpo", port, tmp_path, family)


@pytest.mark.parametrize("family, port", [("sd35", "29547"), ("flux", "29548")])
def test_fsdp2_shards_the_frozen_denoiser_with_tokens_attached_on_two_cpu_processes(family, port, tmp_path):
    """torch's FSDP2 runs on CPU (gloo): each rank holds half the weights, outputs match the unsharded model and the
    tokens' gradients agree. (accelerate's FSDP plugin is not selectable on CPU; see docs/big_models.md.)"""
    torchrun("two_process_fsdp.py", port, str(tmp_path), family)
    ranks = [load_file(tmp_path / f"fsdp-rank{r}.safetensors") for r in (0, 1)]
    for rank in ranks:
        local, full = rank["numel"].tolist()
        assert local <= full // 2 + 64  # its shard only (dim-0 shards round up per parameter)
        assert torch.allclose(rank["sharded"], rank["unsharded"], atol=1e-5)
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])  # same batch on both ranks: the same gradient


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


def test_flagship_recipe_on_two_processes(tmp_path):
    """`accelerate launch` / torchrun: both ranks train, only the main one evaluates and writes the report."""
    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    flags = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "run"), "--stage1-steps", "2"]
    flags += ["--stage1-images", "32", "--stage2-epochs", "1", "--eval-images-per-prompt", "1"]
    flags += ["--sample-steps", "2", "--threads", "1"]
    torchrun(HERE.parent / "recipes" / "softalign_then_ddpo.py", "29543", *flags)
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert set(report["summaries"]) == {"base", "stage1", "stage2"}
    assert (run / "adapter-stage2" / "adapter_model.safetensors").is_file()
    assert (run / "lora" / "softalign" / "pytorch_lora_weights.safetensors").is_file()
    for stage in ("base", "stage1", "stage2"):  # one row per held-out prompt (1 image each), written once
        assert len((run / f"eval-{stage}" / "results.jsonl").read_text().splitlines()) == 111
