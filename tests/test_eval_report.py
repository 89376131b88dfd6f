"""Reports: per-tag Markdown table, counting confusion and over-count rate, runs side by side, verdict grids."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from softalign.eval import (
    caption,
    compare,
    counting_confusion,
    markdown_report,
    result_row,
    save_grid,
    summarize,
)


def counting_row(asked, detected, name="cup"):
    metadata = {
        "tag": "counting",
        "include": [{"class": name, "count": asked}],
        "exclude": [{"class": name, "count": asked + 1}],
        "prompt": f"a photo of {asked} {name}s",
    }
    details = {name: [[0, 0, 1, 1, 0.95]] * detected} if detected else {}
    details["plate"] = [[0, 0, 1, 1, 0.99]]  # other classes do not count
    ok = detected == asked
    return result_row("x.png", metadata, ok, "" if ok else "wrong count", details)


def single_row(ok):
    metadata = {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": "a photo of a cup"}
    return result_row("y.png", metadata, ok, "" if ok else "expected cup>=1, found 0", {})


ROWS = [counting_row(2, 2), counting_row(2, 3), counting_row(3, 5), counting_row(4, 3), single_row(True)]


def test_counting_confusion_and_over_count_rate():
    confusion = counting_confusion(ROWS)
    assert confusion["matrix"] == {2: {2: 1, 3: 1}, 3: {5: 1}, 4: {3: 1}}
    assert confusion["n"] == 4
    assert confusion["over_count_rate"] == 0.5 and confusion["under_count_rate"] == 0.25
    assert counting_confusion([single_row(True)])["over_count_rate"] is None


def test_markdown_report_tables():
    report = markdown_report(ROWS, title="run A")
    assert report.startswith("# run A\n")
    assert "| single_object | 1 | 1 | 100.00% | [20.65%, 100.00%] |" in report
    assert "| counting | 4 | 1 | 25.00% |" in report
    assert "| **overall** (mean of tags) | 5 | 2 | 62.50% | |" in report
    assert "| asked \\ detected | 2 | 3 | 5 |" in report
    assert "| 2 | **1** | 1 | 0 |" in report
    assert "Over-count rate (detected > asked): 50.00%" in report
    assert "## Counting" not in markdown_report([single_row(False)])


def test_compare_runs_side_by_side():
    base = summarize([single_row(True), single_row(False), counting_row(2, 3)])
    better = summarize([single_row(True), single_row(True), counting_row(2, 2)])
    table = compare({"base": base, "better": better})
    lines = table.splitlines()
    assert lines[0] == "| tag | base | better | Δ pts | Δ rel |"
    assert "| single_object | 50.00% | 100.00% | +50.00 | +100.0% |" in lines
    assert "| counting | 0.00% | 100.00% | +100.00 | n/a |" in lines  # relative to 0 is undefined
    assert "| **overall** | 25.00% | 100.00% | +75.00 | +300.0% |" in lines
    only_single = summarize([single_row(False)])
    assert "| counting | 0.00% | – | – | – |" in compare({"base": base, "other": only_single})
    with pytest.raises(ValueError, match="summaries is empty"):
        compare({})


def test_save_grid(tmp_path):
    images = [Image.new("RGB", (32, 24), c) for c in ("red", "green", "blue")]
    captions = [caption(r) for r in (single_row(True), single_row(False), counting_row(2, 3))]
    assert captions[0] == "PASS" and captions[1] == "FAIL\nexpected cup>=1, found 0"
    path = tmp_path / "grid.png"
    save_grid(images, captions, path, columns=2)
    grid = Image.open(path)
    assert grid.width == 64 and grid.height > 48
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((40, 0)) == (0, 128, 0)
    assert os.listdir(tmp_path) == ["grid.png"]
    image_path = tmp_path / "red.png"
    images[0].save(image_path)
    save_grid([image_path], ["PASS"], tmp_path / "one.jpg", columns=4)
    assert Image.open(tmp_path / "one.jpg").width == 32


def test_save_grid_errors(tmp_path):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        save_grid([image], ["a", "b"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="columns must be a positive integer"):
        save_grid([image], ["a"], tmp_path / "g.png", columns=0)
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_grid([image], ["a"], tmp_path / "g.unknown")


def test_cli_eval_keeps_only_the_asked_tags(tmp_path):
    import json

    import pytest

    from softalign.cli import main
    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    flags = ["eval", "--model", str(tmp_path / "model"), "--images-per-prompt", "1", "--steps", "2", "--threads", "1"]
    assert main([*flags, "--tags", "counting", "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {row["tag"] for row in rows} == {"counting"}  # the 9 held-out counting prompts
    with pytest.raises(SystemExit, match="--tags shapes: no metadata line has these tags"):
        main([*flags, "--tags", "shapes", "--out", str(tmp_path / "none")])


def test_cli_eval_samples_with_ddim_eta_and_refuses_it_without_ddim(tmp_path, capsys):
    import json

    import pytest

    from softalign.cli import main
    from softalign.eval.run import run_evaluation
    from softalign.shapes.detector import ShapesDetector
    from softalign.shapes.prompts import split_prompts
    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    flags = ["eval", "--model", str(tmp_path / "model"), "--images-per-prompt", "1", "--steps", "2", "--threads", "1"]
    for eta in ("0", "1"):
        assert main([*flags, "--tags", "counting", "--eta", eta, "--out", str(tmp_path / f"eta{eta}")]) == 0
        assert json.loads((tmp_path / f"eta{eta}" / "run.json").read_text())["eta"] == float(eta)
    # eta 1 draws fresh noise at every step, so the same seeds give other images than deterministic DDIM
    first = (tmp_path / "eta0" / "images" / "00000" / "samples" / "0000.png").read_bytes()
    assert first != (tmp_path / "eta1" / "images" / "00000" / "samples" / "0000.png").read_bytes()
    assert main([*flags, "--eta", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "eta must lie in [0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    plan = [(split_prompts("heldout")[0], 1)]
    with pytest.raises(
        ValueError, match="needs a pipeline that samples with DDIM; StableDiffusion3Pipeline samples with Flow"
    ):
        run_evaluation(tiny_pipeline("sd3"), plan, ShapesDetector.load(), tmp_path / "sd3", eta=1.0)
    assert not (tmp_path / "sd3").exists()  # refused before anything was written


def test_an_evaluation_is_keyed_reused_and_never_silently_overwritten(tmp_path):
    from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
    from softalign.eval.run import run_evaluation
    from softalign.shapes.detector import ShapesDetector
    from softalign.shapes.prompts import split_prompts
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    plan = [(split_prompts("heldout")[0], 1)]
    detector = ShapesDetector.load()
    settings = dict(seed=1, num_inference_steps=2, guidance_scale=1.5, progress=False)
    run_evaluation(pipe, plan, detector, tmp_path / "run", **settings)
    written = json.loads((tmp_path / "run" / "run.json").read_text())
    assert written["key"]["soft_tokens"] is None and written["key"]["sampler"]["steps"] == 2
    stamp = (tmp_path / "run" / "results.jsonl").stat().st_mtime_ns
    run_evaluation(pipe, plan, detector, tmp_path / "run", **settings)  # same key: reused, nothing redrawn
    assert (tmp_path / "run" / "results.jsonl").stat().st_mtime_ns == stamp
    attach_soft_tokens(pipe, SoftTokens(SoftTokensConfig.for_family("sd15", dim=pipe.unet.config.cross_attention_dim)))
    with pytest.raises(FileExistsError, match="differs in: soft_tokens"):
        run_evaluation(pipe, plan, detector, tmp_path / "run", **settings)
    with pytest.raises(FileExistsError, match="differs in: .*seed"):
        run_evaluation(pipe, plan, detector, tmp_path / "run", **{**settings, "seed": 2})
    run_evaluation(pipe, plan, detector, tmp_path / "run", overwrite=True, **settings)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["key"]["soft_tokens"] is not None


def test_a_killed_evaluation_continues_after_its_last_whole_batch_and_equals_an_uninterrupted_one(tmp_path):
    import pytest

    from softalign.eval.run import run_evaluation
    from softalign.shapes.detector import ShapesDetector
    from softalign.shapes.prompts import split_prompts
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    plan = [(line, 2) for line in split_prompts("heldout")[:3]]  # 6 images, batches of 2
    settings = dict(seed=3, num_inference_steps=2, guidance_scale=1.5, batch_size=2, progress=False)
    detector = ShapesDetector.load()
    run_evaluation(pipe, plan, detector, tmp_path / "whole", **settings)

    calls = []

    def killed_in_the_third_batch(image):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return detector(image)

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(pipe, plan, killed_in_the_third_batch, tmp_path / "killed", **settings)
    assert len((tmp_path / "killed" / "results.partial.jsonl").read_text().splitlines()) == 4
    with (tmp_path / "killed" / "results.partial.jsonl").open("a") as file:
        file.write('{"filename": "cut sh')  # a kill in the middle of a write
    drawn = []
    original = type(pipe).__call__

    def counting_calls(self, prompt, **kwargs):
        drawn.extend(prompt)
        return original(self, prompt, **kwargs)

    type(pipe).__call__ = counting_calls
    try:
        with pytest.raises(FileExistsError, match="unfinished evaluation of other weights or settings"):
            run_evaluation(pipe, plan, detector, tmp_path / "killed", **{**settings, "seed": 4})
        run_evaluation(pipe, plan, detector, tmp_path / "killed", **settings)
    finally:
        type(pipe).__call__ = original
    assert len(drawn) == 2  # only the third batch was drawn again
    assert (tmp_path / "killed" / "results.jsonl").read_text() == (tmp_path / "whole" / "results.jsonl").read_text()
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["resumed_after"] == 4
    assert not (tmp_path / "killed" / "progress.json").exists()
    assert not (tmp_path / "killed" / "results.partial.jsonl").exists()
