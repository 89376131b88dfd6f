"""GenEval metadata: accepted forms, errors that name file, line and expectation, and the real file when present."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from PIL import Image

from softalign.eval import COLORS, Detection, evaluate_image, load_metadata, parse_metadata_line, validate_metadata

# Lines in GenEval's format (one per tag), written for these tests.
GOOD_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "two_object",
        "include": [{"class": "cow", "count": 1}, {"class": "kite", "count": 1}],
        "prompt": "a photo of a cow and a kite",
    },
    {
        "tag": "counting",
        "include": [{"class": "clock", "count": 3}],
        "exclude": [{"class": "clock", "count": 4}],
        "prompt": "a photo of three clocks",
    },
    {"tag": "colors", "include": [{"class": "bus", "count": 1, "color": "green"}], "prompt": "a photo of a green bus"},
    {
        "tag": "position",
        "include": [{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}],
        "prompt": "a photo of a dog above a kite",
    },
    {
        "tag": "color_attr",
        "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "apple", "count": 1, "color": "black"}],
        "prompt": "a photo of a red cup and a black apple",
    },
]


def write_lines(tmp_path, lines, name="meta.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_good_lines_load_unchanged(tmp_path):
    path = write_lines(tmp_path, [*GOOD_LINES[:3], "   ", *GOOD_LINES[3:]])
    loaded = load_metadata(path, colors=COLORS)
    assert loaded == GOOD_LINES
    assert [json.dumps(m) for m in loaded] == [json.dumps(m) for m in GOOD_LINES]  # GenEval's metadata column


def test_position_may_be_a_tuple_in_python():
    line = dict(
        GOOD_LINES[4], include=[{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ("below", 0)}]
    )
    assert validate_metadata(line) is line


BAD = [
    ('{"tag": "single_object", "include": [', "broken JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"tag": "single_object", "prompt": "x"}, r"missing key\(s\) \['include'\]"),
    (dict(GOOD_LINES[0], tag="colour"), "unknown tag 'colour'; expected one of"),
    (dict(GOOD_LINES[0], exlude=[]), r"unknown key\(s\) \['exlude'\]"),
    (dict(GOOD_LINES[0], prompt=""), "'prompt' must be a non-empty string"),
    (dict(GOOD_LINES[0], include=[]), "'include' must be a non-empty list"),
    (dict(GOOD_LINES[0], include=[{"class": "cat"}]), r"include\[0\]: missing key\(s\) \['count'\]"),
    (dict(GOOD_LINES[0], include=[{"class": "cat", "count": 0}]), "'count' must be a positive integer, got 0"),
    (dict(GOOD_LINES[0], include=[{"class": "cat", "count": "2"}]), "'count' must be a positive integer, got '2'"),
    (dict(GOOD_LINES[0], include=[{"class": "cat", "count": True}]), "'count' must be a positive integer, got True"),
    (dict(GOOD_LINES[0], include=[{"class": "cat", "count": 1.0}]), "'count' must be a positive integer, got 1.0"),
    (dict(GOOD_LINES[0], include=[{"class": "", "count": 1}]), "'class' must be a non-empty string"),
    (dict(GOOD_LINES[0], include=[{"class": "cat", "count": 1, "colour": "red"}]), r"unknown key\(s\) \['colour'\]"),
    (dict(GOOD_LINES[0], include=[{"class": "cat", "count": 1, "color": ""}]), "'color' must be a non-empty string"),
    (dict(GOOD_LINES[2], exclude=[{"class": "clock", "count": 4, "color": "red"}]), r"exclude\[0\]: unknown key"),
    (dict(GOOD_LINES[2], exclude={"class": "clock", "count": 4}), "'exclude' must be a list"),
    (
        dict(
            GOOD_LINES[4], include=[{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["on", 0]}]
        ),
        "unknown relation 'on'; expected one of",
    ),
    (
        dict(
            GOOD_LINES[4],
            include=[{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 1]}],
        ),
        r"earlier include clause \(0..0\), got 1",
    ),
    (
        dict(
            GOOD_LINES[4],
            include=[{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 5]}],
        ),
        "earlier include clause",
    ),
    (
        dict(
            GOOD_LINES[4],
            include=[{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["above", -1]}],
        ),
        "earlier include clause",
    ),
    (
        dict(GOOD_LINES[4], include=[{"class": "kite", "count": 1, "position": ["above", 0]}]),
        "the first include clause cannot have a position",
    ),
    (
        dict(GOOD_LINES[4], include=[{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": "above"}]),
        r"expected \[relation, clause_index\]",
    ),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_lines_name_file_line_and_expectation(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD_LINES[0], "", bad])
    with pytest.raises(ValueError, match=message) as error:
        load_metadata(path)
    assert str(error.value).startswith(f"{path}, line 3: ")


def test_optional_class_and_colour_vocabularies(tmp_path):
    path = write_lines(tmp_path, [GOOD_LINES[3]])
    with pytest.raises(ValueError, match="line 1: include\\[0\\]: unknown class 'bus'"):
        load_metadata(path, classes=["cat"])
    with pytest.raises(ValueError, match="unknown color 'green'"):
        load_metadata(path, colors=["red"])
    with pytest.raises(ValueError, match="no metadata lines"):
        load_metadata(write_lines(tmp_path, ["", "  "], "empty.jsonl"))
    with pytest.raises(ValueError, match="line 7"):
        parse_metadata_line("{", source="x.jsonl", line=7)


# --- the real GenEval file, when a copy is at $GENEVAL_METADATA ----------------------------------------------------

STEP = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}


def perfect_scene(metadata: dict) -> list[Detection]:
    """Detections that satisfy a line: each clause's objects in a small row, related clauses 200 px apart."""
    detections, centres = [], []
    for clause in metadata["include"]:
        cx, cy = 256.0, 256.0
        if "position" in clause:
            relation, target = clause["position"]
            tx, ty = centres[target]
            cx, cy = tx + 200 * STEP[relation][0], ty + 200 * STEP[relation][1]
        centres.append((cx, cy))
        for i in range(clause["count"]):
            x = cx + 12 * i
            detections.append(
                Detection(clause["class"], 0.95, (x - 4, cy - 4, x + 4, cy + 4), color=clause.get("color"))
            )
    return detections


@pytest.mark.skipif(not os.environ.get("GENEVAL_METADATA"), reason="set GENEVAL_METADATA to GenEval's metadata file")
def test_real_geneval_metadata_parses_and_scores():
    lines = load_metadata(os.environ["GENEVAL_METADATA"], colors=COLORS)
    tags = Counter(m["tag"] for m in lines)
    if len(lines) == 553:  # the published file
        assert tags == {
            "single_object": 80,
            "two_object": 99,
            "counting": 80,
            "colors": 94,
            "position": 100,
            "color_attr": 100,
        }
    image = Image.new("RGB", (512, 512))
    for metadata in lines:
        correct, reason, _ = evaluate_image(image, metadata, lambda im, m=metadata: perfect_scene(m))
        assert (correct, reason) == (True, ""), metadata
        correct, reason, _ = evaluate_image(image, metadata, lambda im: [])
        assert not correct and reason.startswith(f"expected {metadata['include'][0]['class']}>="), metadata
