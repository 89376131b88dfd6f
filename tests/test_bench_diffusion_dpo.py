"""benchmarks/bench_diffusion_dpo.py: softalign's Diffusion-DPO (adapter disabled as the reference) and the two-UNet
reference in the diffusers script's structure give the same loss and gradient (the parity checked before timing)."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_diffusion_dpo  # noqa: E402

SETTINGS = argparse.Namespace(size="tiny", resolution=32, batch=2, pairs=4, device="cpu")


def test_adapter_disabled_reference_equals_a_second_unet_copy(tmp_path):
    parity = bench_diffusion_dpo.check_parity(SETTINGS, str(tmp_path))
    assert parity["loss"] <= 1e-5 and parity["grad"] <= 1e-5, parity
    assert abs(parity["reference_loss"] - math.log(2)) > 1e-3  # model and reference differ: the check has teeth


def test_the_parity_check_sees_a_drifted_draw(tmp_path, monkeypatch):
    draw = bench_diffusion_dpo.draw_inputs

    def other_step(backbone, data, step, batch):  # the reference draws another step's t and noise
        return draw(backbone, data, step + 1, batch)

    monkeypatch.setattr(bench_diffusion_dpo, "draw_inputs", other_step)
    parity = bench_diffusion_dpo.check_parity(SETTINGS, str(tmp_path))
    assert parity["loss"] > 1e-5


@pytest.mark.slow  # two worker processes: about 20 s on one core
def test_bench_diffusion_dpo_prints_the_ratio_table(tmp_path):
    out = tmp_path / "dpo.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_diffusion_dpo.py"), "--size", "tiny", "--batch", "2"]
    command += ["--pairs", "4", "--steps", "1", "--repeats", "1", "--threads", "1", "--device", "cpu"]
    command += ["--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    assert "| softalign |" in result.stdout and "UNet copies" in result.stdout
    medians = json.loads(out.read_text())["medians"]
    assert medians["softalign"]["step_s"] > 0 and medians["reference"]["unet_mb"] > 0
    assert torch.isfinite(torch.tensor(medians["softalign"]["peak_mb"]))
