"""McNemar's exact test on paired per-image verdicts, by hand, and its place in `softalign compare`."""

import json

import pytest

from softalign.eval.paired import mcnemar_exact, paired_tests
from softalign.eval.report import compare
from softalign.eval.summary import result_row, summarize, write_results_jsonl


def test_mcnemar_exact_by_hand():
    # n = b + c discordant pairs, p = min(1, 2 * sum_{i <= min(b, c)} C(n, i) / 2^n)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 0.03125
    assert mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)  # 0.21875
    assert mcnemar_exact(5, 1) == mcnemar_exact(1, 5)
    assert mcnemar_exact(3, 3) == 1.0  # 2 * 42 / 64 > 1, capped
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0385742...
    with pytest.raises(ValueError, match="b must be an int >= 0"):
        mcnemar_exact(-1, 2)


def _rows(verdicts: list[tuple[str, bool]]) -> list[dict]:
    rows = []
    for i, (tag, correct) in enumerate(verdicts):
        metadata = {"tag": tag, "prompt": f"prompt {i % 3}", "include": []}
        rows.append(result_row(f"{i % 3:05d}/samples/{i:04d}.png", metadata, correct, "", {}))
    return rows


def test_paired_tests_count_the_four_cells_per_tag():
    a = _rows([("counting", True), ("counting", False), ("counting", False), ("counting", True), ("colors", True)])
    b = _rows([("counting", True), ("counting", True), ("counting", True), ("counting", False), ("colors", True)])
    tests = paired_tests(a, b)
    assert tests["counting"] == {
        "n": 4, "both": 1, "only_a": 1, "only_b": 2, "neither": 0, "delta": 0.25, "p": 1.0
    }  # fmt: skip
    assert tests["colors"]["both"] == 1 and tests["colors"]["p"] == 1.0
    assert tests["all"]["n"] == 5 and tests["all"]["only_b"] == 2


def test_runs_over_other_images_are_refused():
    a = _rows([("counting", True), ("counting", False)])
    with pytest.raises(ValueError, match="did not score the same images"):
        paired_tests(a, a[:1])


def test_compare_shows_the_p_value_and_the_discordant_counts():
    a = _rows([("counting", False)] * 10)
    b = _rows([("counting", True)] * 10)
    table = compare({"base": summarize(a), "agsm": summarize(b)}, {"agsm": paired_tests(a, b)})
    assert "p (McNemar)" in table
    assert "0.002 (0/10)" in table  # 2 / 1024 = 0.00195
    assert "McNemar's exact test" in table


def test_cli_compare_pairs_runs_with_the_same_seed(tmp_path, capsys):
    from softalign.cli import main

    a = _rows([("counting", False)] * 8 + [("counting", True)] * 2)
    b = _rows([("counting", True)] * 10)
    for name, rows in (("base", a), ("agsm", b)):
        run = tmp_path / name
        run.mkdir()
        write_results_jsonl(rows, run / "results.jsonl")
        (run / "summary.json").write_text(json.dumps(summarize(rows)))
        (run / "run.json").write_text(json.dumps({"seed": 1234}))
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "agsm")]) == 0
    out = capsys.readouterr().out
    assert "0.008 (0/8)" in out  # 2 / 256 = 0.0078


def test_cli_compare_tests_each_run_against_the_one_before(tmp_path, capsys):
    from softalign.cli import main

    plans = {
        "base": [False] * 10,
        "stage1": [True] * 4 + [False] * 6,  # 4 more right than base
        "stage2": [True] * 10,  # 6 more right than stage 1, 10 more than base
    }
    runs = []
    for name, verdicts in plans.items():
        rows = _rows([("counting", v) for v in verdicts])
        run = tmp_path / "curve" / name / "eval" / "step-001000"  # the same folder name for every run
        run.mkdir(parents=True)
        write_results_jsonl(rows, run / "results.jsonl")
        (run / "summary.json").write_text(json.dumps(summarize(rows)))
        (run / "run.json").write_text(json.dumps({"seed": 1234}))
        runs.append(str(run))
    assert main(["compare", *runs, "--previous"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "stage1/eval/step-001000" in header and "stage2/eval/step-001000" in header  # no run dropped
    assert header.count("p vs previous") == 1  # the second run has no run before it but the base
    counting = next(line for line in out.splitlines() if line.startswith("| counting"))
    assert "0.002 (0/10)" in counting  # stage 2 against base: 2 / 1024
    assert "0.031 (0/6)" in counting  # stage 2 against stage 1: 2 / 64
    assert "0.125 (0/4)" in counting  # stage 1 against base: 2 / 16
