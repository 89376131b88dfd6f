"""softalign.eval.side_by_side: several runs on the same images, a grid row per run."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from softalign.eval.side_by_side import side_by_side_grid, spread_over_prompts

PROMPTS = ["a photo of two circles", "a photo of three squares", "a photo of four hearts"]


def _run(folder, colour, prompts=PROMPTS, per_prompt=2, correct=lambda p, i: i == 0):
    """A `softalign eval`-shaped directory: results.jsonl and 8x8 images, `per_prompt` a prompt."""
    rows = []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            name = f"images/{p:05d}/samples/{i:04d}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), colour).save(folder / name)
            ok = correct(p, i)
            rows.append(
                {
                    "filename": name,
                    "tag": "counting",
                    "prompt": prompt,
                    "correct": ok,
                    "reason": "" if ok else "found 5",
                }
            )
    rows.append({"filename": "images/00009/samples/0000.png", "tag": "colors", "prompt": "a red circle", "correct": 1})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_images_are_taken_one_per_prompt_in_turn():
    rows = [{"tag": "counting", "prompt": f"p{p}", "filename": f"{p}-{i}"} for p in range(3) for i in range(3)]
    rows.insert(1, {"tag": "colors", "prompt": "c", "filename": "c-0"})
    assert spread_over_prompts(rows, "counting", 5) == ["0-0", "1-0", "2-0", "0-1", "1-1"]
    assert spread_over_prompts(rows, "counting", 100) == [f"{p}-{i}" for i in range(3) for p in range(3)]
    assert spread_over_prompts(rows, "position", 4) == []


def test_every_run_is_one_row_of_the_same_images(tmp_path):
    runs = {"base": _run(tmp_path / "a", "red"), "AGSM": _run(tmp_path / "b", "blue", correct=lambda p, i: p == 1)}
    shown = side_by_side_grid(runs, tmp_path / "grid.png", images=4, zoom=3)
    assert shown == [f"images/{p:05d}/samples/{i:04d}.png" for p, i in [(0, 0), (1, 0), (2, 0), (0, 1)]]
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    assert grid.width == 4 * 24  # 4 columns of 8-pixel images zoomed 3x
    row_height = grid.height // 2
    assert grid.getpixel((12, 12)) == (255, 0, 0)  # the base's first image, top left
    assert grid.getpixel((12, row_height + 12)) == (0, 0, 255)  # the AGSM row under it


def test_runs_that_drew_different_plans_are_refused(tmp_path):
    base = _run(tmp_path / "a", "red")
    other = _run(tmp_path / "b", "blue", prompts=["a photo of two circles", "a photo of five crosses", "x"])
    with pytest.raises(ValueError, match="must share one plan"):
        side_by_side_grid({"base": base, "other": other}, tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


def test_missing_images_and_tags_are_named(tmp_path):
    base = _run(tmp_path / "a", "red")
    (base / "images/00001/samples/0000.png").unlink()
    with pytest.raises(FileNotFoundError, match="00001/samples/0000.png is missing"):
        side_by_side_grid({"base": base}, tmp_path / "grid.png")
    with pytest.raises(ValueError, match="drew no 'position' images"):
        side_by_side_grid({"base": base}, tmp_path / "grid.png", tag="position")
    with pytest.raises(FileNotFoundError, match="results.jsonl does not exist"):
        side_by_side_grid({"base": tmp_path / "nowhere"}, tmp_path / "grid.png")
    with pytest.raises(ValueError, match="runs is empty"):
        side_by_side_grid({}, tmp_path / "grid.png")
