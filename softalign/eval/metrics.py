"""Reward models as evaluation metrics over a GenEval-layout folder: per-image JSONL and a summary with intervals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .geneval_folder import _load, read_geneval_folder


def mean_interval(values: list[float], z: float = 1.96) -> dict:
    """`n`, `mean`, `std` (sample) and the normal-approximation 95% interval of the mean."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = z * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def score_metrics(
    images_dir: str | os.PathLike, scorers: dict, out: str | os.PathLike, batch_size: int = 16
) -> dict[str, dict]:
    """Score every image of a GenEval-layout folder with each scorer's `metric` (PIL path, exact preprocessing).

    Writes `metrics.jsonl` (one row per image: `filename`, `prompt`, one column per metric) and `metrics.json`
    ([`mean_interval`] per metric) into `out`.

    Args:
        images_dir (`str` or `os.PathLike`): GenEval's layout ([`read_geneval_folder`]).
        scorers (`dict`): metric name -> a [`Scorer`] (e.g. `{"clip": CLIPScore.from_pretrained(...)}`).
        out (`str` or `os.PathLike`): the run directory.
        batch_size (`int`, *optional*, defaults to 16): images per scorer call.
    """
    root, out = Path(images_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = [
        (os.path.join(str(root), path.parent.parent.name, "samples", path.name), metadata["prompt"], path)
        for metadata, paths in read_geneval_folder(root)
        for path in paths
    ]
    rows = [{"filename": filename, "prompt": prompt} for filename, prompt, _ in items]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [_load(path) for _, _, path in chunk]
        prompts = [prompt for _, prompt, _ in chunk]
        for name, scorer in scorers.items():
            for row, value in zip(rows[start : start + batch_size], scorer.metric(images, prompts), strict=True):
                row[name] = value
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    summary = {name: mean_interval([row[name] for row in rows]) for name in scorers}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def metrics_table(summary: dict[str, dict]) -> str:
    """Markdown table of [`score_metrics`]' summary."""
    lines = ["| metric | n | mean | 95% interval |", "|---|---:|---:|---|"]
    for name, s in summary.items():
        low, high = s["ci95"]
        lines.append(f"| {name} | {s['n']} | {s['mean']:.4f} | [{low:.4f}, {high:.4f}] |")
    return "\n".join(lines)
