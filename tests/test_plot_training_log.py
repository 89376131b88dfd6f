"""scripts/plot_training_log.py: resumed runs log a step twice; a bad line is named."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_training_log.py"


def load_script():
    spec = importlib.util.spec_from_file_location("plot_training_log", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_running_mean_and_png(tmp_path):
    script = load_script()
    points = [{"step": s, "value": v} for s, v in [(1, 4.0), (2, 2.0), (3, 0.0)]]
    assert [p["value"] for p in script.smoothed(points, 2)] == [4.0, 3.0, 1.0]
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"stage": "t2i", "step": s, "loss": v}) for s, v in [(25, 1.0), (50, 0.5), (50, 0.4)]]
    log.write_text("\n".join(lines) + "\n")
    script.main([str(log), str(tmp_path / "curve.png"), "--window", "1"])
    assert Image.open(tmp_path / "curve.png").size == (360, 220)
    log.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"log\.jsonl, line 2: expected a JSON record with stage, step and loss"):
        script.main([str(log), str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()
