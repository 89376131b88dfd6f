"""The benchmark scripts run end to end on a tiny budget (their numbers come from running them alone)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_inference_prints_the_overhead_ratio(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_inference.py"),
            "--size",
            "32",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "overhead ratio" in result.stdout
    data = json.loads(out.read_text())
    assert data["ratio"] > 0 and len(data["wall_seconds"]["base"]) == 1


def test_bench_softalign_step_checks_the_loss_and_prints_the_table(tmp_path):
    out = tmp_path / "step.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_softalign_step.py"),
            "--batches",
            "4",
            "--steps",
            "1",
            "--size",
            "32",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "loss check" in result.stdout and "| 4 |" in result.stdout
    data = json.loads(out.read_text())
    assert data["loss_difference"] < 1e-5 and data["rows"][0]["softalign"]["pairs_per_s"] > 0


@pytest.mark.slow  # builds the 860M-parameter SD1.5 UNet (3.4 GB) and runs 4 calls: about a minute on 2 cores
def test_bench_inference_real_size_times_the_real_unet(tmp_path):
    out = tmp_path / "real.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--real-size", "--batch", "1"]
    command += ["--repeats", "1", "--threads", "1", "--device", "cpu", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    assert "overhead ratio" in result.stdout
    data = json.loads(out.read_text())
    assert data["parameters"] > 8e8 and data["ratio"] > 0
