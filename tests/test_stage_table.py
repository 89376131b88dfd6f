"""softalign.eval.stage_table and scripts/results_table.py: stages as rows, CFG sweeps, paired tests per row."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from softalign.eval.stage_table import stage_table
from softalign.eval.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TWO_CIRCLES = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "prompt": "a photo of two circles"}


def _rows(detected: list[int]) -> list[dict]:
    """Counting images of "two circles" with these detected counts (right when exactly 2)."""
    return [
        {
            "filename": f"00000/samples/{i:04d}.png",
            "tag": "counting",
            "prompt": TWO_CIRCLES["prompt"],
            "correct": k == 2,
            "reason": "",
            "metadata": json.dumps(TWO_CIRCLES),
            "details": json.dumps({"circle": [0.99] * k}),
        }
        for i, k in enumerate(detected)
    ]


def _run(detected: list[int], seed: int = 1234) -> dict:
    rows = _rows(detected)
    return {"summary": summarize(rows), "rows": rows, "run": {"seed": seed}}


def test_the_table_tests_each_row_against_the_base_and_the_row_above_at_the_same_scale():
    runs = {
        ("base", 1.5): _run([2, 1, 3, 3]),  # right: image 0
        ("base", 3.0): _run([2, 2, 3, 3]),  # right: 0, 1
        ("agsm", 1.5): _run([2, 2, 2, 3]),  # right: 0, 1, 2 -> only after: 2 images
        ("agsm", 3.0): _run([2, 2, 2, 2]),
        ("then ddpo", 1.5): _run([1, 2, 2, 2]),  # against agsm: lost 0, won 3
        ("then ddpo", 3.0): _run([2, 2, 2, 2]),
    }
    table = stage_table(runs, ["base", "agsm", "then ddpo"], [1.5, 3.0])
    rows = {(row["stage"], row["guidance_scale"]): row for row in table["rows"]}

    assert rows[("base", 1.5)]["vs_base"] is None
    assert rows[("base", 1.5)]["over_count_rate"] == 0.5  # two of four drew 3
    assert rows[("base", 1.5)]["under_count_rate"] == 0.25  # one drew 1
    agsm = rows[("agsm", 1.5)]["vs_base"]["counting"]
    # McNemar exact, b = 0 and c = 2: p = 2 * C(2, 0) / 2^2 = 0.5; delta = 2 / 4
    assert (agsm["only_a"], agsm["only_b"], agsm["delta"], agsm["p"]) == (0, 2, 0.5, 0.5)
    assert rows[("agsm", 1.5)]["vs_previous"] is None  # the row above is the base itself
    # CFG 3 is tested against the base at CFG 3 (two right there), not at 1.5
    assert rows[("agsm", 3.0)]["vs_base"]["counting"]["only_b"] == 2
    previous = rows[("then ddpo", 1.5)]["vs_previous"]["counting"]
    assert (previous["only_a"], previous["only_b"], previous["p"]) == (1, 1, 1.0)
    assert rows[("then ddpo", 1.5)]["over_count_rate"] == 0.0

    markdown = table["markdown"]
    assert "| agsm | 1.5 | 75.0 [" in markdown and "+50.0 (p 0.500; 0/2)" in markdown
    assert "| base | 1.5 | 25.0 [4.6, 69.9] | 25.0 | 50.0 | 25.0 |" in markdown  # overall, over-, under-count
    assert "| then ddpo | 1.5 | 75.0 [30.1, 95.4] | 75.0 | 0.0 | 25.0 |" in markdown
    assert "row above" in markdown and "| then ddpo | 1.5 | +0.0 (p 1.000; 1/1)" in markdown


def test_a_missing_scale_or_mixed_seeds_is_refused():
    runs = {("base", 1.5): _run([2]), ("agsm", 1.5): _run([2], seed=7)}
    with pytest.raises(ValueError, match="different seeds"):
        stage_table(runs, ["base", "agsm"], [1.5])
    with pytest.raises(ValueError, match=r"no run for \[\('agsm', 3.0\)\]"):
        stage_table(
            {("base", 1.5): _run([2]), ("base", 3.0): _run([2]), ("agsm", 1.5): _run([2])}, ["base", "agsm"], [1.5, 3.0]
        )


def test_runs_of_different_images_are_refused():
    with pytest.raises(ValueError, match="same images"):
        stage_table({("base", 1.5): _run([2, 2]), ("agsm", 1.5): _run([2])}, ["base", "agsm"], [1.5])


def test_the_spec_names_what_is_wrong(tmp_path):
    import results_table

    spec = tmp_path / "table.yaml"
    spec.write_text("model: m\nstages:\n  - name: base\n  - name: Base\n")
    with pytest.raises(ValueError, match="must differ"):
        results_table.read_spec(str(spec))
    spec.write_text("model: m\nstages:\n  - name: agsm\n    soft_tokens: nowhere\n")
    with pytest.raises(FileNotFoundError, match="agsm.*nowhere"):
        results_table.read_spec(str(spec))
    spec.write_text("model: m\nstages: [{name: base}]\nguidance: 3\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['guidance'\]"):
        results_table.read_spec(str(spec))
    spec.write_text("model: m\nstages: [{name: base}]\nguidance_scales: [0]\n")
    with pytest.raises(ValueError, match="positive"):
        results_table.read_spec(str(spec))
    spec.write_text("model: m\nstages: [{name: base}]\nimages_per_prompt: 4\nimages_per_tag: 300\n")
    with pytest.raises(ValueError, match="not both"):
        results_table.read_spec(str(spec))
    spec.write_text("model: m\nstages: [{name: base}]\nimages_per_tag: 0\n")
    with pytest.raises(ValueError, match="images_per_tag must be a positive integer"):
        results_table.read_spec(str(spec))


def test_the_default_plan_is_at_least_300_images_per_tag(tmp_path):
    import results_table

    spec = tmp_path / "table.yaml"
    spec.write_text("model: m\nstages: [{name: base}]\n")
    read = results_table.read_spec(str(spec))
    args = results_table.eval_args(read, read["stages"][0], 1.5, tmp_path / "cell", threads=1)
    assert args[args.index("--min-images-per-tag") + 1] == "300" and "--images-per-prompt" not in args
    spec.write_text("model: m\nstages: [{name: base}]\nimages_per_prompt: 4\n")
    read = results_table.read_spec(str(spec))
    args = results_table.eval_args(read, read["stages"][0], 1.5, tmp_path / "cell", threads=1)
    assert args[args.index("--images-per-prompt") + 1] == "4" and "--min-images-per-tag" not in args


def test_the_script_evaluates_every_stage_and_scale_once_and_resumes(tmp_path):
    import results_table

    from softalign import SoftTokens, save_soft_tokens
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(tmp_path / "model")
    save_soft_tokens(SoftTokens.for_pipeline(pipe), tmp_path / "tokens")
    spec = tmp_path / "table.yaml"
    spec.write_text(
        f"model: {tmp_path / 'model'}\ntags: [counting]\nimages_per_prompt: 1\nsteps: 2\nguidance_scales: [1.5, 3]\n"
        f"stages:\n  - name: base\n  - name: AGSM tokens\n    soft_tokens: {tmp_path / 'tokens'}\n"
    )
    out = tmp_path / "table"
    assert results_table.main([str(spec), "--out", str(out)]) == 0
    assert sorted(p.parent.name + "/" + p.name for p in out.glob("*/cfg-*")) == [
        "agsm-tokens/cfg-1.5",
        "agsm-tokens/cfg-3",
        "base/cfg-1.5",
        "base/cfg-3",
    ]
    table = json.loads((out / "table.json").read_text())
    assert [(r["stage"], r["guidance_scale"]) for r in table["rows"]] == [
        ("base", 1.5),
        ("base", 3.0),
        ("AGSM tokens", 1.5),
        ("AGSM tokens", 3.0),
    ]
    assert "results_table.py" in (out / "table.md").read_text()

    # every stage one above the other on the same counting images, at each scale
    assert {p.name for p in out.glob("grid-*.png")} == {"grid-counting-cfg-1.5.png", "grid-counting-cfg-3.png"}
    drawn = Image.open(next((out / "base" / "cfg-3").glob("images/*/samples/0000.png")))
    grid = Image.open(out / "grid-counting-cfg-3.png")
    assert grid.width == 9 * 2 * drawn.width  # the held-out split's 9 counting prompts, an image each, zoomed 2x
    assert grid.height > 2 * 2 * drawn.height  # two rows (base, AGSM), each with its captions

    # a second run reuses every finished evaluation: no image is drawn again (the side-by-side grids are redrawn)
    images = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if not p.name.startswith("grid-")}
    assert results_table.main([str(spec), "--out", str(out)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in images.items())
