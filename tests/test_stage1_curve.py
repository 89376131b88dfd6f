"""scripts/stage1_curve.py: one schedule stopped at each evaluation point, resumable, keyed evaluations."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _run(model: Path, out: Path, eval_every: int, *extra: str) -> None:
    import stage1_curve

    argv = ["--model", str(model), "--out", str(out), "--max-steps", "2", "--eval-every", str(eval_every)]
    argv += ["--train-batch-size", "4", "--images", "16", "--resolution", "32", "--tags", "counting"]
    argv += ["--images-per-tag", "1", "--steps", "2", "--threads", "1", *extra]
    assert stage1_curve.main(argv) == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from softalign.testing import tiny_pipeline

    path = tmp_path_factory.mktemp("curve") / "model"
    tiny_pipeline("sd15").save_pretrained(path)
    return path


def test_a_curve_stopped_at_each_point_ends_where_one_uninterrupted_run_ends(model, tmp_path):
    _run(model, tmp_path / "stopped", 1, "--count-groups", "0.5")
    _run(model, tmp_path / "whole", 2, "--count-groups", "0.5")
    curve = json.loads((tmp_path / "stopped" / "curve.json").read_text())
    assert [point["step"] for point in curve["points"]] == [0, 1, 2]  # step 0: the base, on the same plan
    assert all("counting" in point and "over_count_rate" in point for point in curve["points"])
    tokens = Path("adapters", "step-000002", "adapter", "adapter_model.safetensors")
    stopped, whole = (load_file(tmp_path / run / tokens) for run in ("stopped", "whole"))
    assert stopped.keys() == whole.keys() and all(torch.equal(stopped[k], whole[k]) for k in stopped)

    # re-running the finished command trains and scores nothing again: every file is left as it was
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "stopped").rglob("*") if p.is_file()}
    _run(model, tmp_path / "stopped", 1, "--count-groups", "0.5")
    changed = [p for p, t in written.items() if p.stat().st_mtime_ns != t and p.name not in ("curve.json", "curve.png")]
    assert changed == []


def test_an_evaluation_written_for_another_adapter_is_refused(model, tmp_path):
    _run(model, tmp_path / "run", 2)
    run_json = tmp_path / "run" / "eval" / "step-000002" / "run.json"
    run = json.loads(run_json.read_text())
    run["key"]["adapter"] = "0" * 16
    run_json.write_text(json.dumps(run))
    with pytest.raises(Exception, match="adapter|key|refus"):
        _run(model, tmp_path / "run", 2)


def test_tokens_of_another_capacity_and_placement_are_trained_and_saved(model, tmp_path):
    _run(model, tmp_path / "run", 2, "--n-tokens", "8", "--unet-blocks", "down,mid,up")
    config = json.loads((tmp_path / "run" / "adapters" / "step-000002" / "adapter" / "adapter_config.json").read_text())
    assert config["n_tokens"] == 8 and config["unet_blocks"] == ["down", "mid", "up"]


def test_a_run_killed_between_points_continues_from_its_last_checkpoint_alike(model, tmp_path, monkeypatch):
    from softalign import SoftAlignTrainer

    _run(model, tmp_path / "whole", 2, "--save-every", "1")
    train = tmp_path / "whole" / "train"
    assert {p.name for p in train.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    tokens = Path("adapters", "step-000002", "adapter", "adapter_model.safetensors")
    finished = load_file(tmp_path / "whole" / tokens)
    # as if killed after step 1's checkpoint: step 2, its adapter and its evaluation never happened
    for gone in (train / "checkpoint-2", tmp_path / "whole" / "adapters", tmp_path / "whole" / "eval" / "step-000002"):
        shutil.rmtree(gone)
    steps, step = [], SoftAlignTrainer._optimizer_step
    monkeypatch.setattr(SoftAlignTrainer, "_optimizer_step", lambda self, i: steps.append(i) or step(self, i))
    _run(model, tmp_path / "whole", 2, "--save-every", "1")
    assert steps == [1]  # only step 2 (index 1) was trained again
    resumed = load_file(tmp_path / "whole" / tokens)
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)
    with pytest.raises(SystemExit):
        _run(model, tmp_path / "bad", 2, "--save-every", "3")
