"""Per-image result rows in GenEval's columns, and GenEval's summary (`evaluation/summary_scores.py`) of them.

A row is a dict with GenEval's columns `filename, tag, prompt, correct, reason, metadata, details`; GenEval stores
`metadata` and `details` as JSON strings inside the JSONL, and so does [`result_row`]. Every reader here accepts
them either as strings or as dicts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

from ..atomic import atomic_write_text
from .metadata import TAGS

COLUMNS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for `k` successes in `n` trials (95% for `z = 1.96`).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%, which matters for tags
    like single_object (near 100%) or position (near 0%).

    Args:
        k (`int`): successes, `0 <= k <= n`.
        n (`int`): trials, `n >= 1`.
        z (`float`, *optional*, defaults to 1.96): the normal quantile.
    """
    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"wilson_interval: {name} must be an int, got {value!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"wilson_interval: z must be > 0, got {z!r}")
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_dict(value, column: str, index: int) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"row {index}: column {column!r} is not valid JSON ({error.msg})") from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"row {index}: column {column!r} must be a dict or a JSON object string, got {value!r}")


def _correct(row: Mapping, index: int) -> bool:
    if "correct" not in row or "tag" not in row:
        raise ValueError(f"row {index}: needs 'tag' and 'correct' (GenEval columns {list(COLUMNS)}), got {sorted(row)}")
    value = row["correct"]
    # numpy.bool_ and 0/1 are fine; the string "False" would be truthy, so it is refused.
    if isinstance(value, bool) or type(value).__name__ == "bool_" or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"row {index}: 'correct' must be a bool, got {value!r}")


def _prompt_key(row: Mapping, index: int) -> str:
    # GenEval groups prompts by the metadata string; parsing it first makes dicts and strings (any key order or
    # spacing) of the same metadata group together.
    if row.get("metadata") is not None:
        return json.dumps(_as_dict(row["metadata"], "metadata", index), sort_keys=True)
    if "prompt" in row:
        return str(row["prompt"])
    raise ValueError(f"row {index}: needs 'metadata' or 'prompt' to group images into prompts")


def _tag_order(tags: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(tags))
    return [t for t in TAGS if t in seen] + [t for t in seen if t not in TAGS]


def summarize(rows: Iterable[Mapping]) -> dict:
    """GenEval's summary of per-image rows, with a Wilson 95% interval per tag.

    Args:
        rows (`Iterable[Mapping]`): rows with at least `tag`, `correct` and `metadata` (or `prompt`).

    Returns:
        `dict`: `tags` maps each tag (GenEval's order, then unknown tags as met) to `n`, `k`, `accuracy`, `ci95`;
        `overall` is the unweighted mean of the tag accuracies (GenEval's score: each tag weighs the same, whatever
        its number of images); `images` and `prompts` give `n`, `k`, `accuracy`, where a prompt is correct if any
        of its images is.
    """
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    total = 0
    for index, row in enumerate(rows):
        correct = _correct(row, index)
        per_tag.setdefault(str(row["tag"]), []).append(correct)
        key = _prompt_key(row, index)
        per_prompt[key] = per_prompt.get(key, False) or correct
        total += 1
    if not total:
        raise ValueError("summarize: rows is empty; expected at least one result row")
    tags = {}
    for tag in _tag_order(per_tag):
        n, k = len(per_tag[tag]), sum(per_tag[tag])
        tags[tag] = {"n": n, "k": k, "accuracy": k / n, "ci95": wilson_interval(k, n)}
    images_k = sum(sum(v) for v in per_tag.values())
    prompts_k = sum(per_prompt.values())
    return {
        "tags": tags,
        "overall": sum(t["accuracy"] for t in tags.values()) / len(tags),
        "images": {"n": total, "k": images_k, "accuracy": images_k / total},
        "prompts": {"n": len(per_prompt), "k": prompts_k, "accuracy": prompts_k / len(per_prompt)},
    }


def format_summary(summary: Mapping) -> str:
    """The text GenEval's `summary_scores.py` prints, from a [`summarize`] result."""
    lines = [
        "Summary",
        "=======",
        f"Total images: {summary['images']['n']}",
        f"Total prompts: {summary['prompts']['n']}",
        f"% correct images: {summary['images']['accuracy']:.2%}",
        f"% correct prompts: {summary['prompts']['accuracy']:.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    for tag, stats in summary["tags"].items():
        lines.append(f"{tag:<16} = {stats['accuracy']:.2%} ({stats['k']} / {stats['n']})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def result_row(filename: str, metadata: Mapping, correct: bool, reason: str, details: Mapping) -> dict:
    """One row in GenEval's columns; `metadata` and `details` become JSON strings, as GenEval writes them."""
    return {
        "filename": str(filename),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(dict(metadata)),
        "details": json.dumps(dict(details)),
    }


def write_results_jsonl(rows: Iterable[Mapping], path: str | os.PathLike) -> None:
    """Write rows as GenEval's results JSONL, atomically: readers see the old file or the whole new one.

    Dict `metadata` / `details` are turned into JSON strings (GenEval's form); strings are written as given.
    """
    path = os.fspath(path)
    lines = []
    for index, row in enumerate(rows):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(f"write_results_jsonl: row {index} lacks column(s) {missing}; expected {list(COLUMNS)}")
        record = {c: row[c] for c in COLUMNS}
        record["correct"] = _correct(row, index)
        for column in ("metadata", "details"):
            if not isinstance(record[column], str):
                record[column] = json.dumps(_as_dict(record[column], column, index))
        lines.append(json.dumps(record) + "\n")
    atomic_write_text(path, "".join(lines))


def read_results_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a results JSONL (ours or GenEval's) back into rows; `metadata` / `details` stay as stored."""
    source = os.fspath(path)
    rows = []
    with open(source, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{source}, line {number}: broken JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{source}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
