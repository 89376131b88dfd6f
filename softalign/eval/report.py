"""Markdown reports of GenEval results: per-tag accuracy with intervals, counting errors, runs side by side, grids.

All functions take the rows of [`result_row`] / [`read_results_jsonl`] or the dicts of [`summarize`]; nothing here
re-scores an image.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_file
from .summary import _as_dict, summarize


def counting_confusion(rows: Iterable[Mapping]) -> dict:
    """Asked count vs detected count over the `counting` rows.

    The detected count is the number of confident detections of the asked class, i.e. the length of its list in
    the row's `details` (which, for counting, holds only scores above 0.9, at most 16 per class).

    Returns:
        `dict`: `matrix` maps asked -> detected -> images; `n` counting images; `over_count_rate` and
        `under_count_rate`, the shares with detected > asked and detected < asked (`None` when `n` is 0).
    """
    matrix: dict[int, dict[int, int]] = {}
    n = over = under = 0
    for index, row in enumerate(rows):
        if row.get("tag") != "counting":
            continue
        metadata = _as_dict(row["metadata"], "metadata", index)
        details = _as_dict(row.get("details") or {}, "details", index)
        clause = metadata["include"][0]
        asked, detected = clause["count"], len(details.get(clause["class"], []))
        cell = matrix.setdefault(asked, {})
        cell[detected] = cell.get(detected, 0) + 1
        n += 1
        over += detected > asked
        under += detected < asked
    return {
        "matrix": {a: dict(sorted(d.items())) for a, d in sorted(matrix.items())},
        "n": n,
        "over_count_rate": over / n if n else None,
        "under_count_rate": under / n if n else None,
    }


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def counting_table(confusion: Mapping) -> str:
    """Markdown table of a [`counting_confusion`] result: one row per asked count, one column per detected count."""
    matrix = confusion["matrix"]
    if not matrix:
        return "_no counting images_"
    columns = sorted({d for row in matrix.values() for d in row})
    lines = [
        "| asked \\ detected | " + " | ".join(str(c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for asked, row in matrix.items():
        cells = [f"**{row[c]}**" if c == asked and c in row else str(row.get(c, 0)) for c in columns]
        lines.append(f"| {asked} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Over-count rate (detected > asked): {_pct(confusion['over_count_rate'])}; "
        f"under-count rate: {_pct(confusion['under_count_rate'])} (n = {confusion['n']})."
    )
    return "\n".join(lines)


def tag_table(summary: Mapping) -> str:
    """Markdown table of a [`summarize`] result: n, accuracy and Wilson 95% interval per tag, then the overall."""
    lines = ["| tag | n | correct | accuracy | 95% interval |", "|---|---:|---:|---:|---|"]
    for tag, s in summary["tags"].items():
        low, high = s["ci95"]
        lines.append(f"| {tag} | {s['n']} | {s['k']} | {_pct(s['accuracy'])} | [{_pct(low)}, {_pct(high)}] |")
    images = summary["images"]
    lines.append(f"| **overall** (mean of tags) | {images['n']} | {images['k']} | {_pct(summary['overall'])} | |")
    return "\n".join(lines)


def markdown_report(rows: Iterable[Mapping], title: str = "GenEval results") -> str:
    """A Markdown report of result rows: per-tag table, images and prompts correct, counting confusion matrix."""
    rows = list(rows)
    summary = summarize(rows)
    parts = [
        f"# {title}",
        "",
        tag_table(summary),
        "",
        f"Correct images: {_pct(summary['images']['accuracy'])} ({summary['images']['k']} / {summary['images']['n']}); "
        f"correct prompts (any image): {_pct(summary['prompts']['accuracy'])} "
        f"({summary['prompts']['k']} / {summary['prompts']['n']}).",
    ]
    confusion = counting_confusion(rows)
    if confusion["n"]:
        parts += ["", "## Counting: asked vs detected", "", counting_table(confusion)]
    return "\n".join(parts) + "\n"


def _change(base: float | None, value: float | None) -> tuple[str, str]:
    if base is None or value is None:
        return "–", "–"
    points = f"{100 * (value - base):+.2f}"
    relative = f"{100 * (value - base) / base:+.1f}%" if base else "n/a"  # relative to 0 is undefined
    return points, relative


def compare(
    summaries: Mapping[str, Mapping],
    paired: Mapping[str, Mapping] | None = None,
    previous: Mapping[str, Mapping] | None = None,
) -> str:
    """Markdown table of several runs' [`summarize`] results side by side.

    The first run is the baseline; every later run gets its accuracy, the change in absolute percentage points
    and the relative change in percent against it. Tags missing from a run show as `–`.

    Args:
        summaries (`Mapping[str, Mapping]`): run name -> summary, in display order.
        paired (`Mapping[str, Mapping]`, *optional*): run name -> [`paired_tests`] of the baseline's rows against
            that run's (same prompts and seeds); adds McNemar's exact p-value beside each change.
        previous (`Mapping[str, Mapping]`, *optional*): run name -> [`paired_tests`] of the run before it against
            that run; adds a "p vs previous" column, for tables whose rows build on each other (base, stage 1, stage 2).
    """
    if not summaries:
        raise ValueError("compare: summaries is empty; expected {run name: summarize(rows)} for at least one run")
    names = list(summaries)
    tags = list(dict.fromkeys(tag for s in summaries.values() for tag in s["tags"]))
    header = ["tag", names[0]]
    for name in names[1:]:
        header += [name, "Δ pts", "Δ rel"] + (["p (McNemar)"] if paired and name in paired else [])
        header += ["p vs previous"] if previous and name in previous else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def accuracy(summary: Mapping, tag: str | None) -> float | None:
        if tag is None:
            return summary["overall"]
        return summary["tags"][tag]["accuracy"] if tag in summary["tags"] else None

    for tag in [*tags, None]:
        base = accuracy(summaries[names[0]], tag)
        cells = ["**overall**" if tag is None else tag, "–" if base is None else _pct(base)]
        for name in names[1:]:
            value = accuracy(summaries[name], tag)
            cells += ["–" if value is None else _pct(value), *_change(base, value)]
            if paired and name in paired:
                test = paired[name].get("all" if tag is None else tag)
                cells.append("–" if test is None else _p_value(test))
            if previous and name in previous:
                test = previous[name].get("all" if tag is None else tag)
                cells.append("–" if test is None else _p_value(test))
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += [
            "",
            "p: McNemar's exact test on the per-image verdicts against the first run (same prompts and seeds); "
            "on the overall row, over all images pooled.",
        ]
    if previous:
        lines += [
            "p vs previous: the same test against the run in the column before (discordant counts: only that run / only this one)."
        ]
    return "\n".join(lines)


def _p_value(test: Mapping) -> str:
    p = test["p"]
    text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return f"{text} ({test['only_a']}/{test['only_b']})"


def caption(row: Mapping) -> str:
    """`"PASS"`, or `"FAIL"` and GenEval's reason on the next lines, for a grid cell."""
    correct = bool(row["correct"])
    reason = str(row.get("reason") or "")
    return "PASS" if correct else ("FAIL\n" + reason if reason else "FAIL")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            trial = f"{current} {word}" if current else word
            if current and draw.textlength(trial, font=font) > width:
                lines.append(current)
                current = word
            else:
                current = trial
        lines.append(current)
    return lines


def save_grid(
    images: Sequence[Image.Image | str | os.PathLike],
    captions: Sequence[str],
    path: str | os.PathLike,
    columns: int = 4,
    font_size: int = 12,
) -> None:
    """Save images in a grid, each with its caption (e.g. [`caption`] of its row: verdict and reason) underneath.

    Cells are as large as the largest image; captions wrap to the cell width. The file is written atomically.

    Args:
        images (`Sequence`): PIL images or paths to them.
        captions (`Sequence[str]`): one per image; newlines start new lines.
        path (`str` or `os.PathLike`): output file; its extension picks the format (`.png`, `.jpg`, ...).
        columns (`int`, *optional*, defaults to 4): images per row.
        font_size (`int`, *optional*, defaults to 12): caption text size in pixels.
    """
    if len(images) != len(captions):
        raise ValueError(f"save_grid: got {len(images)} images but {len(captions)} captions; expected one per image")
    if not images:
        raise ValueError("save_grid: images is empty; expected at least one image")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"save_grid: columns must be a positive integer, got {columns!r}")
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"save_grid: cannot tell the image format from {path!r}; use e.g. .png or .jpg")
    opened = [Image.open(i).convert("RGB") if isinstance(i, (str, os.PathLike)) else i.convert("RGB") for i in images]
    font, pad = _font(font_size), 4
    cell_w = max(i.width for i in opened)
    image_h = max(i.height for i in opened)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, str(text), font, cell_w - 2 * pad) for text in captions]
    line_h = font_size + 3
    caption_h = max(len(lines) for lines in wrapped) * line_h + 2 * pad
    columns = min(columns, len(opened))
    rows = -(-len(opened) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (image_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(opened, wrapped, strict=True)):
        x, y = (index % columns) * cell_w, (index // columns) * (image_h + caption_h)
        grid.paste(image, (x + (cell_w - image.width) // 2, y))
        colour = {"PASS": (0, 120, 0), "FAIL": (170, 0, 0)}.get(lines[0], (0, 0, 0))
        for number, text in enumerate(lines):
            draw.text((x + pad, y + image_h + pad + number * line_h), text, fill=colour, font=font)
    with atomic_file(path) as temp:
        grid.save(temp, format=image_format)
