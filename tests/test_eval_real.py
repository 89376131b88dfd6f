"""`softalign eval` on real-model plug-ins: GenEval's layout, scoring it again, resuming, bad folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from softalign.cli import main
from softalign.eval.geneval_folder import (
    PARTIAL,
    generate_geneval_folder,
    geneval_protocol,
    read_geneval_folder,
    score_geneval_folder,
)
from softalign.eval.metrics import compare_metrics, load_captions, mean_interval
from softalign.testing import tiny_pipeline
from softalign.testing.models import tiny_clip, tiny_mask2former

LINES = [
    {"tag": "single_object", "include": [{"class": "teddy bear", "count": 1}], "prompt": "a photo of a teddy bear"},
    {
        "tag": "counting",
        "include": [{"class": "cat", "count": 2}],
        "exclude": [{"class": "cat", "count": 3}],
        "prompt": "a photo of two cats",
    },
    {
        "tag": "colors",
        "include": [{"class": "tv remote", "count": 1, "color": "red"}],
        "prompt": "a photo of a red tv remote",
    },
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_pipeline("sd15").save_pretrained(root / "pipe")
    tiny_mask2former(root / "mask2former")
    tiny_clip(root / "clip")
    metadata = root / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return root


class AlwaysCat:
    """A detector stub that sees one confident cat everywhere and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        from softalign.eval import Detection

        self.calls += 1
        return [Detection("cat", np.float32(0.95), (0, 0, 4, 4), color="red")]


def verdicts(path):
    rows = [json.loads(line) for line in open(path)]
    return {row["filename"].split("images" + os.sep, 1)[-1]: (row["correct"], row["reason"]) for row in rows}


def test_eval_end_to_end_writes_genevals_layout_and_rescoring_agrees(models, tmp_path):
    out = tmp_path / "run"
    flags = ["eval", "--model", str(models / "pipe"), "--metadata", str(models / "evaluation_metadata.jsonl")]
    flags += ["--detector", f"mask2former={models / 'mask2former'}", "--clip", str(models / "clip")]
    flags += ["--images-per-prompt", "2", "--steps", "2", "--batch-size", "4", "--metric", f"clip={models / 'clip'}"]
    flags += ["--threads", "1"]
    assert main([*flags, "--out", str(out)]) == 0
    for p, line in enumerate(LINES):
        folder = out / "images" / f"{p:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert len(rows) == 6 and set(rows[0]) >= {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert "GenEval rules, Mask2Former (transformers) detector" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["images"]["n"] == 6
    assert len(open(out / "metrics.jsonl").readlines()) == 6 and "clip" in json.loads(
        (out / "metrics.json").read_text()
    )
    assert not (out / PARTIAL).exists()
    again = tmp_path / "rescored"
    flags = ["eval", "--images", str(out / "images"), "--detector", f"mask2former={models / 'mask2former'}"]
    assert main([*flags, "--clip", str(models / "clip"), "--threads", "1", "--out", str(again)]) == 0
    assert verdicts(again / "results.jsonl") == verdicts(out / "results.jsonl")


def test_generation_resumes_and_keeps_images_already_written(models, tmp_path):
    from softalign.cli import load_pipeline

    pipe = load_pipeline(str(models / "pipe"))
    images = tmp_path / "images"
    settings = dict(images_per_prompt=2, num_inference_steps=2, batch_size=3, progress=False)
    first = generate_geneval_folder(pipe, LINES[:2], images, **settings)
    assert (first["written"], first["kept"]) == (4, 0)
    kept, redrawn = images / "00000" / "samples" / "0001.png", images / "00001" / "samples" / "0000.png"
    stamp, original = os.stat(kept).st_mtime_ns, np.asarray(Image.open(redrawn))
    os.unlink(redrawn)  # an interrupted run: one image missing
    second = generate_geneval_folder(pipe, LINES[:2], images, **settings)
    assert (second["written"], second["kept"]) == (1, 3)
    assert os.stat(kept).st_mtime_ns == stamp  # untouched
    # per-image seeds: the same image again, up to the float noise of a batch of 1 against a batch of 3
    difference = np.abs(np.asarray(Image.open(redrawn)).astype(int) - original.astype(int))
    assert difference.max() <= 2, difference.max()
    with pytest.raises(ValueError, match="another prompt's metadata"):
        generate_geneval_folder(pipe, LINES[1:], images, **settings)
    assert geneval_protocol(pipe) == {
        "images_per_prompt": 4,
        "seed": 42,
        "num_inference_steps": 50,
        "guidance_scale": 9.0,
    }


def _folder(root, lines=LINES, images=2):
    for p, line in enumerate(lines):
        samples = root / f"{p:05d}" / "samples"
        samples.mkdir(parents=True)
        (root / f"{p:05d}" / "metadata.jsonl").write_text(json.dumps(line))
        for i in range(images):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(samples / f"{i:04d}.png")
    return root


def test_scoring_resumes_after_an_interruption(tmp_path):
    images = _folder(tmp_path / "images")
    reference = score_geneval_folder(images, AlwaysCat(), tmp_path / "full", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "full" / "results.jsonl")]
    out = tmp_path / "resumed"
    out.mkdir()
    # two rows made it to disk, the third was cut mid-line
    (out / PARTIAL).write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:20])
    detector = AlwaysCat()
    assert score_geneval_folder(images, detector, out, batch_size=2, progress=False) == reference
    assert detector.calls == 4
    assert [json.loads(line) for line in open(out / "results.jsonl")] == rows
    assert verdicts(out / "results.jsonl")[f"00001{os.sep}samples{os.sep}0000.png"] == (
        False,
        "expected cat>=2, found 1",
    )


def test_not_genevals_layout_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_geneval_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "0000.png")
    with pytest.raises(ValueError, match=r"no numbered prompt folders \(found \['0000.png'\]\)"):
        read_geneval_folder(tmp_path / "flat")
    root = _folder(tmp_path / "a")
    os.unlink(root / "00001" / "metadata.jsonl")
    with pytest.raises(FileNotFoundError, match="00001.metadata.jsonl is missing"):
        read_geneval_folder(root)
    root = _folder(tmp_path / "b")
    (root / "00002" / "metadata.jsonl").write_text('{"tag": "colors", "include": [')
    with pytest.raises(ValueError, match="00002.metadata.jsonl, line 1: broken JSON"):
        read_geneval_folder(root)
    root = _folder(tmp_path / "c", images=0)
    with pytest.raises(ValueError, match="no images"):
        read_geneval_folder(root)
    with pytest.raises(SystemExit):  # argparse: eval has no positional folder
        main(["eval", str(root)])
    assert main(["eval", "--images", str(root), "--out", str(tmp_path / "o")]) == 2  # needs a detector or a metric
    assert main(["eval", "--images", str(root), "--detector", "yolo=x", "--out", str(tmp_path / "o")]) == 2


def test_colour_prompts_without_clip_fail_before_any_work(models, tmp_path, capsys):
    flags = ["eval", "--model", str(models / "pipe"), "--metadata", str(models / "evaluation_metadata.jsonl")]
    flags += ["--detector", f"mask2former={models / 'mask2former'}", "--out", str(tmp_path / "run"), "--threads", "1"]
    assert main(flags) == 2
    assert "colors / color_attr prompts" in capsys.readouterr().err and not (tmp_path / "run" / "images").exists()


def test_mean_interval():
    s = mean_interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx([2 - 1.96 / 3**0.5, 2 + 1.96 / 3**0.5])


def test_captions_files(tmp_path):
    (tmp_path / "c.txt").write_text("a cat on a mat\n\n  two dogs  \n")
    assert load_captions(tmp_path / "c.txt") == ["a cat on a mat", "two dogs"]
    (tmp_path / "c.jsonl").write_text('{"caption": "a cat"}\n"two dogs"\n{"image_id": 3, "text": "a bus"}\n')
    assert load_captions(tmp_path / "c.jsonl") == ["a cat", "two dogs", "a bus"]
    (tmp_path / "broken.jsonl").write_text('{"caption": "a cat"}\n{"caption": "two\n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2: broken JSON"):
        load_captions(tmp_path / "broken.jsonl")
    (tmp_path / "nokey.jsonl").write_text('{"image_id": 3}\n')
    with pytest.raises(ValueError, match="nokey.jsonl, line 1: expected a JSON string or an object"):
        load_captions(tmp_path / "nokey.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_captions(tmp_path / "missing.txt")


def test_coco_protocol_metrics_side_by_side(models, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat on a mat\ntwo dogs in a park\n")
    flags = [
        "eval",
        "--model",
        str(models / "pipe"),
        "--captions",
        str(captions),
        "--metric",
        f"clip={models / 'clip'}",
    ]
    flags += ["--metric", f"hps={models / 'clip'}", "--images-per-prompt", "2", "--steps", "2", "--threads", "1"]
    assert main([*flags, "--out", str(tmp_path / "base")]) == 0
    assert main([*flags, "--guidance-scale", "2", "--out", str(tmp_path / "other")]) == 0
    assert json.loads((tmp_path / "base" / "images" / "00001" / "metadata.jsonl").read_text()) == {
        "prompt": "two dogs in a park"
    }
    assert not (tmp_path / "base" / "results.jsonl").exists()  # no GenEval rules for captions
    table = compare_metrics({"base": tmp_path / "base", "other": tmp_path / "other"})
    assert table.splitlines()[0] == "| metric | base | other | Δ (paired 95%) |"
    assert "(n=4)" in table and table.count("\n| ") == 2  # clip and hps rows, 4 paired images
    # metrics alone on an existing folder need only the prompts
    assert (
        main(
            [
                "eval",
                "--images",
                str(tmp_path / "base" / "images"),
                "--metric",
                f"clip={models / 'clip'}",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    with pytest.raises(FileNotFoundError, match="metrics.jsonl is missing"):
        compare_metrics({"x": tmp_path})
    assert main([*flags, "--detector", f"mask2former={models / 'mask2former'}", "--out", str(tmp_path / "bad")]) == 2
