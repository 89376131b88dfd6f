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
    images_dir: str | os.PathLike, scorers: dict, out: str | os.PathLike, batch_size: int = 16, geneval: bool = True
) -> dict[str, dict]:
    """Score every image of a GenEval-layout folder with each scorer's `metric` (PIL path, exact preprocessing).

    Writes `metrics.jsonl` (one row per image: `filename`, `prompt`, one column per metric) and `metrics.json`
    ([`mean_interval`] per metric) into `out`.

    Args:
        images_dir (`str` or `os.PathLike`): GenEval's layout ([`read_geneval_folder`]).
        scorers (`dict`): metric name -> a [`Scorer`] (e.g. `{"clip": CLIPScore.from_pretrained(...)}`).
        out (`str` or `os.PathLike`): the run directory.
        batch_size (`int`, *optional*, defaults to 16): images per scorer call.
        geneval (`bool`, *optional*, defaults to `True`): the folder's metadata are GenEval lines (`False`: captions).
    """
    root, out = Path(images_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = [
        (os.path.join(str(root), path.parent.parent.name, "samples", path.name), metadata["prompt"], path)
        for metadata, paths in read_geneval_folder(root, geneval=geneval)
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


def load_captions(path: str | os.PathLike) -> list[str]:
    """Captions for the COCO protocol: a `.jsonl` file (one JSON object a line with a `caption`, `prompt` or `text`
    string, or a JSON string) or a text file (one caption a line). Blank lines are skipped; errors name the file and
    the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist; expected one caption a line, or JSONL")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    captions = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if path.suffix != ".jsonl":
            captions.append(text.strip())
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: broken JSON ({error.msg} at column {error.colno})") from None
        if isinstance(value, dict):
            value = next((value[k] for k in ("caption", "prompt", "text") if k in value), None)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{path}, line {number}: expected a JSON string or an object with a non-empty 'caption', 'prompt' "
                f"or 'text', got {text.strip()[:80]!r}"
            )
        captions.append(value.strip())
    if not captions:
        raise ValueError(f"{path}: no captions; expected one caption a line (or JSONL)")
    return captions


def compare_metrics(runs: dict[str, str | os.PathLike], z: float = 1.96) -> str:
    """Markdown table of several runs' metrics side by side; the first run is the baseline.

    Runs drawn from the same captions and seeds are paired image by image (`filename` inside the run's images
    folder), so each later run also gets the mean paired difference and its 95% interval, which is much tighter
    than the difference of two independent intervals.

    Args:
        runs (`dict`): run name -> a run directory holding `metrics.jsonl` (from [`score_metrics`]).
    """
    tables = {}
    for name, folder in runs.items():
        path = Path(folder) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; expected a run directory written with --metric")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        tables[name] = {_image_key(row["filename"]): row for row in rows}
    names = list(tables)
    base = tables[names[0]]
    metrics = [k for k in next(iter(base.values())) if k not in ("filename", "prompt")]
    header = ["metric", names[0]] + [f"{n} | Δ (paired 95%)" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|---|" * (len(names) - 1)]
    for metric in metrics:
        b = mean_interval([row[metric] for row in base.values()], z)
        cells = [metric, f"{b['mean']:.4f} [{b['ci95'][0]:.4f}, {b['ci95'][1]:.4f}]"]
        for name in names[1:]:
            other = tables[name]
            o = mean_interval([row[metric] for row in other.values()], z)
            shared = sorted(set(base) & set(other))
            d = mean_interval([other[k][metric] - base[k][metric] for k in shared], z) if shared else None
            delta = "–" if d is None else f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (n={d['n']})"
            cells += [f"{o['mean']:.4f} [{o['ci95'][0]:.4f}, {o['ci95'][1]:.4f}]", delta]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _image_key(filename: str) -> str:
    parts = Path(filename).parts
    return "/".join(parts[-3:])  # <00000>/samples/<0000>.png, the same in every run
