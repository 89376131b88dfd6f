"""benchmarks/bench_rewards.py runs end to end on a tiny budget (its numbers come from running it alone)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_rewards_prints_batched_and_single_rates(tmp_path):
    out = tmp_path / "rewards.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_rewards.py"), "--images", "2", "--batch", "2"]
    command += ["--size", "32", "--repeats", "1", "--threads", "1", "--device", "cpu", "--detector-scale", "133,80"]
    command += ["--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True, cwd=ROOT, env=env)
    assert "| scorer | batched | one at a time | speed-up |" in result.stdout
    rates = json.loads(out.read_text())["images_per_second"]
    assert {"CLIPScore reward (tensor)", "Mask2Former detector", "CLIP colours (one image, N crops)"} <= set(rates)
    assert all(r["batched"] > 0 and r["one_at_a_time"] > 0 for r in rates.values())
