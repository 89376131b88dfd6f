"""benchmarks/bench_ddpo.py: softalign's DDPO, its TRL adapter and trl 0.23.1 compute the same log-probs, PPO loss and
gradient (the parity the benchmark checks before timing), and the benchmark runs end to end."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from accelerate.state import AcceleratorState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_ddpo  # noqa: E402

SETTINGS = argparse.Namespace(
    size="tiny", resolution=32, steps=3, sample_batch=2, batches=1, train_batch=2, epochs=1, device="cpu", threads=1
)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    yield
    AcceleratorState._reset_state()  # trl's Accelerator settings must not leak into later tests


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return bench_ddpo.save_base_pipeline(str(tmp_path_factory.mktemp("pipe")), "tiny", 32)


def test_all_three_score_trajectories_and_ppo_losses_alike(pipeline_dir, tmp_path):
    parity = bench_ddpo.check_parity(pipeline_dir, SETTINGS, str(tmp_path))
    differences = bench_ddpo.parity_differences(parity)
    assert {"log_prob_softalign", "loss_softalign", "grad_softalign", "log_prob_softalign-trl-adapter"} <= set(
        differences
    )
    assert max(differences.values()) <= 1e-5, differences
    assert parity["trl_loss"] != 0 and parity["trl_grad_max"] > 0  # a loss and gradient that can differ


def test_the_parity_check_sees_a_changed_adapter(pipeline_dir, tmp_path, monkeypatch):
    make_batch = bench_ddpo._softalign_batch

    def nudged(trainer, *args):  # softalign's LoRA 0.1% off trl's: every comparison must notice
        with torch.no_grad():
            for param in bench_ddpo.lora_state(trainer, "softalign").values():
                param.mul_(1.001)
        return make_batch(trainer, *args)

    monkeypatch.setattr(bench_ddpo, "_softalign_batch", nudged)
    parity = bench_ddpo.check_parity(pipeline_dir, SETTINGS, str(tmp_path))
    assert parity["log_prob_softalign"] > 1e-5 and parity["grad_softalign"] > 1e-5
    assert parity["log_prob_softalign-trl-adapter"] <= 1e-5


@pytest.mark.slow  # three worker processes that each import trl: about 40 s on one core
def test_bench_ddpo_prints_the_ratio_table(tmp_path):
    out = tmp_path / "ddpo.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_ddpo.py"), "--size", "tiny", "--steps", "2"]
    command += ["--sample-batch", "2", "--batches", "1", "--train-batch", "2", "--epochs", "1", "--repeats", "1"]
    command += ["--threads", "1", "--device", "cpu", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True, cwd=ROOT)
    assert "| softalign |" in result.stdout and "x trl" in result.stdout
    data = json.loads(out.read_text())
    assert set(data["medians"]) == set(bench_ddpo.VARIANTS)
    assert all(m["images_per_s"] > 0 and m["timesteps_per_s"] > 0 for m in data["medians"].values())
