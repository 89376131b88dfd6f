"""A paper-style results table: post-training stages as rows, each at several guidance scales, tags as columns.

`softalign compare` puts a few runs side by side with tags as rows. A main table has the transpose: one row per
stage (base, fine-tuning, SoftREPA, AGSM, ... ) and per CFG value, so that an effect a guidance change alone would
give is read off the base's own rows. Every cell comes from `softalign eval` run directories that drew the same
prompts and seeds, so every difference gets McNemar's exact test on the per-image verdicts: against the base at
the same CFG, and against the stage in the row above at the same CFG (stages that build on each other).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .paired import paired_tests
from .report import counting_confusion
from .summary import read_results_jsonl


def load_run(run: str | os.PathLike) -> dict:
    """`summary.json`, `results.jsonl` and `run.json` of one `softalign eval` directory."""
    run = Path(run)
    for name in ("summary.json", "results.jsonl", "run.json"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run} has no {name} (expected a finished `softalign eval` output directory).")
    return {
        "summary": json.loads((run / "summary.json").read_text()),
        "rows": read_results_jsonl(run / "results.jsonl"),
        "run": json.loads((run / "run.json").read_text()),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(summary: Mapping, tag: str) -> str:
    s = summary["tags"].get(tag)
    if s is None:
        return "–"
    low, high = s["ci95"]
    return f"{_pct(s['accuracy'])} [{_pct(low)}, {_pct(high)}]"


def _test_cell(test: Mapping | None) -> str:
    if test is None:
        return "–"
    p = test["p"]
    text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return f"{100 * test['delta']:+.1f} (p {text}; {test['only_a']}/{test['only_b']})"


def stage_table(runs: Mapping[tuple[str, float], Mapping], stages: Sequence[str], scales: Sequence[float]) -> dict:
    """The table's numbers and its Markdown, from loaded runs.

    Args:
        runs (`Mapping[tuple[str, float], Mapping]`): `(stage, guidance scale)` -> [`load_run`] result, for every
            stage and scale given.
        stages (`Sequence[str]`): the rows in display order; the first is the base every row is tested against.
        scales (`Sequence[float]`): the guidance scales of every stage.

    Returns:
        `dict`: `markdown`, and `rows`: per stage and scale the summary, the over- and under-count rates, and the
        paired tests against the base (`vs_base`) and the stage above (`vs_previous`) at the same scale.
    """
    if not stages or not scales:
        raise ValueError(f"stage_table: need at least one stage and one scale, got {list(stages)} and {list(scales)}")
    missing = [(stage, scale) for stage in stages for scale in scales if (stage, scale) not in runs]
    if missing:
        raise ValueError(f"stage_table: no run for {missing} (every stage needs every guidance scale)")
    seeds = {runs[key]["run"].get("seed") for key in runs}
    if len(seeds) > 1:
        raise ValueError(
            f"stage_table: the runs used different seeds {sorted(map(str, seeds))}; a paired table needs one"
        )
    tags = list(dict.fromkeys(tag for key in runs for tag in runs[key]["summary"]["tags"]))
    rows = []
    for index, stage in enumerate(stages):
        for scale in scales:
            run = runs[(stage, scale)]
            base = runs[(stages[0], scale)]
            previous = runs[(stages[index - 1], scale)] if index > 0 else None
            confusion = counting_confusion(run["rows"])
            rows.append(
                {
                    "stage": stage,
                    "guidance_scale": scale,
                    "summary": run["summary"],
                    "over_count_rate": confusion["over_count_rate"],
                    "under_count_rate": confusion["under_count_rate"],
                    "vs_base": paired_tests(base["rows"], run["rows"]) if index > 0 else None,
                    "vs_previous": paired_tests(previous["rows"], run["rows"]) if index > 1 else None,
                }
            )
    return {"rows": rows, "tags": tags, "markdown": _markdown(rows, tags)}


def _markdown(rows: list[dict], tags: list[str]) -> str:
    def rate(row, key: str) -> str:
        return "–" if row[key] is None else _pct(row[key])

    def head(columns: list[str]) -> list[str]:
        return ["| " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * (len(columns) - 2)]

    lines = [
        "Accuracy, % [Wilson 95% interval]; over- / under-count: share of counting images with more / fewer objects "
        "than asked.",
        "",
    ]
    lines += head(["stage", "CFG", *tags, "overall", "over-count", "under-count"])
    for row in rows:
        cells = [row["stage"], f"{row['guidance_scale']:g}", *(_cell(row["summary"], tag) for tag in tags)]
        counts = [rate(row, "over_count_rate"), rate(row, "under_count_rate")]
        lines.append("| " + " | ".join([*cells, _pct(row["summary"]["overall"]), *counts]) + " |")
    for key, title in (
        ("vs_base", "Change against the base at the same CFG"),
        ("vs_previous", "Change against the stage in the row above at the same CFG"),
    ):
        tested = [row for row in rows if row[key] is not None]
        if not tested:
            continue
        lines += ["", f"{title}: points (McNemar's exact p; images right only before / only after).", ""]
        lines += head(["stage", "CFG", *tags, "all images"])
        for row in tested:
            cells = [row["stage"], f"{row['guidance_scale']:g}"]
            cells += [_test_cell(row[key].get(tag)) for tag in [*tags, "all"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
