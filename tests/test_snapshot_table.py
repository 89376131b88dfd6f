"""scripts/snapshot_table.py: what a kept table holds, and that keeping it again copies only what changed."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("snapshot_table", ROOT / "scripts" / "snapshot_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def test_a_kept_table_has_what_a_resumed_run_needs_and_nothing_it_rebuilds(tmp_path):
    snapshot = _load()
    src, dst = tmp_path / "runs", tmp_path / "kept"
    run = "rows/agsm-tokens/"
    _touch(src, run + "curve.json", run + "started.json", run + "adapters/step-000500/adapter/adapter_config.json")
    _touch(src, run + "cache/abc/renders.pt", run + "train/softalign_config.json", run + "train/.softalign.lock")
    _touch(src, *(run + f"train/checkpoint-{step}/optimizer.pt" for step in (500, 1000)))
    _touch(src, run + "eval/step-000500/summary.json", run + "eval/step-000500/images/00000/a.png")
    _touch(src, run + "eval/step-001000/results.jsonl", "table-spec.yaml", "notes.txt", "table/grid-counting-cfg-3.png")
    _touch(src, "rows/ddpo/done.json", "rows/ddpo/lora/adapter_model.safetensors", "rows/ddpo/checkpoint-25/x.pt")
    _touch(src, "rows/ddpo/checkpoint-25/trainer_state.json", "rows/ddpo/checkpoint-24/trainer_state.json")
    _touch(src, "rows/ddpo-counting/started.json", "rows/ddpo-counting/checkpoint-3/trainer_state.json")  # running
    _touch(src, "rows/agsm-then-dpo/stage1/cache/a/images.safetensors", "rows/agsm-then-dpo/stage2/checkpoint-9/x.pt")
    _touch(src, "table/base/cfg-1.5/summary.json", "table/base/cfg-1.5/grid.png", "table/base/cfg-1.5/images/0/a.png")
    _touch(src, "table/base/cfg-3/progress.json", "table/base/cfg-3/results.partial.jsonl")  # still being scored
    assert snapshot.main([str(src), str(dst)]) == 0
    kept = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert kept == [
        "rows/agsm-tokens/adapters/step-000500/adapter/adapter_config.json",
        "rows/agsm-tokens/curve.json",
        "rows/agsm-tokens/eval/step-000500/summary.json",
        "rows/agsm-tokens/started.json",
        "rows/agsm-tokens/train/checkpoint-1000/optimizer.pt",
        "rows/agsm-tokens/train/softalign_config.json",
        "rows/ddpo-counting/started.json",
        "rows/ddpo/checkpoint-25/trainer_state.json",
        "rows/ddpo/done.json",
        "rows/ddpo/lora/adapter_model.safetensors",
        "table-spec.yaml",
        "table/base/cfg-1.5/grid.png",
        "table/base/cfg-1.5/summary.json",
        "table/grid-counting-cfg-3.png",
    ]
    assert snapshot.copy(src, dst) == 0  # nothing changed: nothing copied
    (src / run / "curve.json").write_text("later")
    assert snapshot.copy(src, dst) == 1 and (dst / run / "curve.json").read_text() == "later"
    assert snapshot.main([str(dst), str(tmp_path / "back")]) == 0  # and back: the same files
    assert sorted(p.relative_to(tmp_path / "back") for p in (tmp_path / "back").rglob("*") if p.is_file()) == sorted(
        p.relative_to(dst) for p in dst.rglob("*") if p.is_file()
    )


def test_a_folder_without_rows_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load().main([str(tmp_path), str(tmp_path / "kept")])
    assert "no rows/ folder" in capsys.readouterr().err
