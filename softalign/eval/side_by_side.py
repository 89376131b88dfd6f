"""One picture of several runs on the same prompts and seeds: a grid row per run, a column per image.

Each run's own `grid.png` shows that run. A results table needs the other view: the base, SoftREPA, AGSM, ... one
above the other on the very same held-out images (same prompt, same seed), so that what a stage changed is seen
and not only counted. The images are picked from the first run's plan, one per prompt in turn (the first image of
every prompt, then the second, ...), so a few columns cover every count or object pair of the tag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from .report import caption, save_grid
from .summary import read_results_jsonl


def spread_over_prompts(rows: list[Mapping], tag: str, images: int) -> list[str]:
    """File names of `images` images of `tag`: the first of every prompt in plan order, then the second, ..."""
    by_prompt: dict[str, list[str]] = {}
    for row in rows:
        if row["tag"] == tag:
            by_prompt.setdefault(row["prompt"], []).append(row["filename"])
    chosen: list[str] = []
    depth = 0
    while len(chosen) < images and any(depth < len(files) for files in by_prompt.values()):
        chosen += [files[depth] for files in by_prompt.values() if depth < len(files)]
        depth += 1
    return chosen[:images]


def side_by_side_grid(
    runs: Mapping[str, str | os.PathLike],
    path: str | os.PathLike,
    tag: str = "counting",
    images: int = 9,
    zoom: int = 2,
    font_size: int = 11,
) -> list[str]:
    """Save a grid of the same `images` images of `tag` from every run (one grid row per run, in the given order).

    Args:
        runs (`Mapping[str, str | os.PathLike]`): row label -> a finished `softalign eval` output directory. Every
            run must have drawn the same plan (the same file names for the same prompts).
        path (`str` or `os.PathLike`): the PNG (or any format Pillow writes) to save, atomically.
        tag (`str`, *optional*, defaults to `"counting"`): the GenEval tag whose images are shown.
        images (`int`, *optional*, defaults to 9): columns; the held-out counting split has 9 prompts.
        zoom (`int`, *optional*, defaults to 2): nearest-neighbour upscaling, so 64-pixel shapes and their captions
            stay readable.
        font_size (`int`, *optional*, defaults to 11): caption text size in pixels.

    Returns:
        `list[str]`: the file names shown, relative to each run directory.

    Raises:
        `FileNotFoundError`: a run has no `results.jsonl` or lacks a chosen image (e.g. a snapshot kept without its
            images).
        `ValueError`: no runs, a tag the first run did not draw, or runs whose plans differ.
    """
    if not runs:
        raise ValueError("side_by_side_grid: runs is empty; expected at least one `softalign eval` directory")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"side_by_side_grid: images must be a positive integer, got {images!r}")
    verdicts = {label: _verdicts(Path(run)) for label, run in runs.items()}
    first_label = next(iter(runs))
    first = list(verdicts[first_label].values())
    chosen = spread_over_prompts(first, tag, images)
    if not chosen:
        tags = sorted({row["tag"] for row in first})
        raise ValueError(f"side_by_side_grid: {runs[first_label]} drew no {tag!r} images; its tags are {tags}")
    prompts = [verdicts[first_label][name]["prompt"] for name in chosen]
    cells, captions = [], []
    for row_index, (label, run) in enumerate(runs.items()):
        for column, (name, expected) in enumerate(zip(chosen, prompts, strict=True)):
            row = verdicts[label].get(name)
            if row is None or row["prompt"] != expected:
                raise ValueError(
                    f"side_by_side_grid: {run} has no {name} for {expected!r}; the runs must share one plan "
                    f"(the same prompts, images per prompt and seed as {runs[first_label]})"
                )
            file = Path(run) / name
            if not file.is_file():
                raise FileNotFoundError(f"side_by_side_grid: {file} is missing (the run was kept without images?)")
            image = Image.open(file).convert("RGB")
            cells.append(image.resize((image.width * zoom, image.height * zoom), Image.NEAREST))
            text = caption(row)
            if row_index == 0:
                text += f"\n{expected}"
            if column == 0:
                text += f"\n[{label}]"
            captions.append(text)
    save_grid(cells, captions, path, columns=len(chosen), font_size=font_size)
    return chosen


def _verdicts(run: Path) -> dict[str, Mapping]:
    results = run / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"side_by_side_grid: {results} does not exist (expected a finished `softalign eval`)")
    return {row["filename"]: row for row in read_results_jsonl(results)}
