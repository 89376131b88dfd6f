"""The recipes run end to end on a tiny budget, so they cannot rot."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


def test_flagship_recipe_runs_all_stages_and_writes_the_report(tmp_path):
    import softalign_then_ddpo as recipe

    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    code = recipe.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "run"),
            "--stage1-steps",
            "2",
            "--stage1-images",
            "16",
            "--stage2-epochs",
            "1",
            "--eval-images-per-prompt",
            "1",
            "--sample-steps",
            "2",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    run = tmp_path / "run"
    for name in ("report.md", "report.json", "curves.png", "grid-base.png", "grid-stage1.png", "grid-stage2.png"):
        assert (run / name).is_file(), name
    assert (run / "adapter-stage2" / "adapter_model.safetensors").is_file()
    report = json.loads((run / "report.json").read_text())
    assert set(report["summaries"]) == {"base", "stage1", "stage2"}
    assert "counting" in (run / "report.md").read_text()
