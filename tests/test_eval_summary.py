"""GenEval's summary: Wilson intervals, unweighted overall, prompts correct, print format, results JSONL."""

from __future__ import annotations

import json
import os

import pytest

from softalign.eval import (
    COLUMNS,
    format_summary,
    read_results_jsonl,
    result_row,
    summarize,
    wilson_interval,
    write_results_jsonl,
)


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # by hand: centre = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
        (0, 10, 0.0, 0.27754),  # centre 0.138770, half 0.138770
        (5, 10, 0.23659, 0.76341),  # centre 0.5, half 0.263414
        (10, 10, 0.72246, 1.0),  # mirror of 0 / 10
        (8, 10, 0.49016, 0.94332),  # centre 0.716745, half 0.226581
        (1, 1, 0.20654, 1.0),
    ],
)
def test_wilson_interval_hand_computed(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-5)


def test_wilson_interval_errors():
    for k, n in [(0, 0), (3, 2), (-1, 5), (1.5, 3), (True, 3)]:
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(k, n)


def meta(tag, prompt, **extra):
    return {"tag": tag, "include": [{"class": prompt, "count": 1}], "prompt": f"a photo of a {prompt}", **extra}


def rows_fixture():
    # single_object: 1 prompt x 1 image, correct; position: 2 prompts x 2 images, 1 of 4 correct
    rows = [result_row("s0.png", meta("single_object", "cat"), True, "", {"cat": [[0, 0, 1, 1, 0.9]]})]
    verdicts = {("dog", 0): True, ("dog", 1): False, ("cow", 0): False, ("cow", 1): False}
    for (name, seed), ok in verdicts.items():
        rows.append(result_row(f"{name}{seed}.png", meta("position", name), ok, "" if ok else "expected", {}))
    return rows


def test_summary_overall_is_unweighted_mean_of_tags():
    summary = summarize(rows_fixture())
    assert summary["tags"]["single_object"] == {"n": 1, "k": 1, "accuracy": 1.0, "ci95": wilson_interval(1, 1)}
    assert summary["tags"]["position"]["accuracy"] == 0.25
    assert summary["overall"] == pytest.approx((1.0 + 0.25) / 2)  # not 2 / 5 = 0.4 (the image mean)
    assert summary["images"] == {"n": 5, "k": 2, "accuracy": 0.4}
    assert summary["prompts"] == {"n": 3, "k": 2, "accuracy": pytest.approx(2 / 3)}  # any image correct


def test_summary_tag_order_and_prompt_grouping_accept_dicts_and_strings():
    a = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a red cat"}
    rows = [
        {"tag": "colors", "correct": False, "metadata": json.dumps(a)},
        {"tag": "colors", "correct": True, "metadata": dict(reversed(list(a.items())))},  # same prompt, other order
        {"tag": "single_object", "correct": True, "prompt": "a photo of a cat"},
        {"tag": "my_tag", "correct": 1, "prompt": "x"},
    ]
    summary = summarize(rows)
    assert list(summary["tags"]) == ["single_object", "colors", "my_tag"]
    assert summary["prompts"] == {"n": 3, "k": 3, "accuracy": 1.0}


def test_summary_errors():
    with pytest.raises(ValueError, match="rows is empty"):
        summarize([])
    with pytest.raises(ValueError, match="row 0: 'correct' must be a bool, got 'False'"):
        summarize([{"tag": "colors", "correct": "False", "prompt": "x"}])
    with pytest.raises(ValueError, match="row 0: needs 'tag' and 'correct'"):
        summarize([{"correct": True}])
    with pytest.raises(ValueError, match="row 0: column 'metadata' is not valid JSON"):
        summarize([{"tag": "colors", "correct": True, "metadata": "{"}])


def test_format_summary_matches_genevals_print():
    expected = "\n".join(
        [
            "Summary",
            "=======",
            "Total images: 5",
            "Total prompts: 3",
            "% correct images: 40.00%",
            "% correct prompts: 66.67%",
            "",
            "Task breakdown",
            "==============",
            "single_object    = 100.00% (1 / 1)",
            "position         = 25.00% (1 / 4)",
            "",
            "Overall score (avg. over tasks): 0.62500",
        ]
    )
    assert format_summary(summarize(rows_fixture())) == expected


def test_result_row_has_genevals_columns_and_json_strings():
    m = meta("single_object", "cat")
    row = result_row("x.png", m, True, "", {"cat": [[0.0, 0.0, 1.0, 1.0, 0.9]]})
    assert tuple(row) == COLUMNS
    assert row["metadata"] == json.dumps(m) and json.loads(row["details"]) == {"cat": [[0.0, 0.0, 1.0, 1.0, 0.9]]}


def test_write_results_jsonl_round_trip_and_atomic_replace(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    rows = rows_fixture()
    rows[0] = dict(rows[0], metadata=json.loads(rows[0]["metadata"]), details={"cat": []})  # dicts become strings
    write_results_jsonl(rows, path)
    back = read_results_jsonl(path)
    assert len(back) == 5 and all(tuple(r) == COLUMNS for r in back)
    assert isinstance(back[0]["metadata"], str) and json.loads(back[0]["details"]) == {"cat": []}
    assert summarize(back) == summarize(rows_fixture())
    write_results_jsonl(back[:1], path)  # replaces the old file whole
    assert len(read_results_jsonl(path)) == 1
    assert os.listdir(path.parent) == ["results.jsonl"]  # no temporary file left behind


def test_write_results_jsonl_failure_keeps_old_file(tmp_path):
    path = tmp_path / "results.jsonl"
    write_results_jsonl(rows_fixture(), path)
    before = path.read_text()
    with pytest.raises(ValueError, match=r"row 1 lacks column\(s\) \['details'\]"):
        write_results_jsonl([rows_fixture()[0], {k: v for k, v in rows_fixture()[1].items() if k != "details"}], path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["results.jsonl"]


def test_read_results_jsonl_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"tag": "colors"}\n\nnot json\n')
    with pytest.raises(ValueError, match="r.jsonl, line 3: broken JSON"):
        read_results_jsonl(path)
