"""Shapes-world image-caption pairs: every image is drawn from a GenEval metadata line with its own seed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .captions import CaptionNoise, noisy_caption, web_lines
from .prompts import split_prompts
from .render import render_scene
from .vocabulary import TAGS


def sample_metadata(rng: np.random.Generator, lines: list[dict], tags=TAGS) -> dict:
    """A tag uniformly, then a prompt of that tag uniformly (color_attr has 20x the prompts of counting)."""
    tag = tags[int(rng.integers(len(tags)))]
    members = [line for line in lines if line["tag"] == tag]
    return members[int(rng.integers(len(members)))]


def count_group(rng: np.random.Generator, lines: list[dict], size: int = 4) -> list[dict]:
    """`size` prompts that differ only in how many objects of one class they ask for ("a circle", "two circles", ...),
    in random order: a group of hard negatives for the contrastive stage, where each image's other captions are wrong
    only in the count. Drawn from the single_object and counting lines of `lines` (e.g. the training split)."""
    by_class: dict[str, dict[int, dict]] = {}
    for line in lines:
        if line.get("tag") in ("single_object", "counting"):
            clause = line["include"][0]
            by_class.setdefault(clause["class"], {})[int(clause["count"])] = line
    classes = sorted(name for name, counts in by_class.items() if len(counts) >= size)
    if not classes:
        raise ValueError(f"No class has {size} different counts among the given lines' single_object/counting prompts.")
    counts = by_class[classes[int(rng.integers(len(classes)))]]
    chosen = rng.choice(sorted(counts), size=size, replace=False)
    return [counts[int(c)] for c in chosen]


def render_batch(
    batch_size: int,
    seed: int,
    split: str = "train",
    size: int = 64,
    caption_dropout: float = 0.0,
    noise: CaptionNoise | None = None,
) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A deterministic batch: images in [-1, 1] `(batch, 3, size, size)`, captions and metadata lines.

    `split` is `"train"` (the curated post-training set: clean captions of the training split), `"heldout"`, or
    `"web"`: every combination, held-out ones included, with captions corrupted by `noise` (web-like pretraining;
    `softalign.shapes.captions`). The same `seed` always gives the same batch, so a resumed training run sees
    exactly the data it would have seen.
    """
    if noise is not None and split != "web":
        raise ValueError(f"Caption noise applies to the 'web' split only; got split={split!r} with noise.")
    rng = np.random.default_rng(seed)
    lines = web_lines() if split == "web" else split_prompts(split)
    noise = noise or CaptionNoise()
    images, captions, metadata = [], [], []
    for _ in range(batch_size):
        line = sample_metadata(rng, lines)
        image, _ = render_scene(line, rng, size=size)
        images.append(pil_to_tensor(image))
        caption = noisy_caption(line, noise, rng) if split == "web" else line["prompt"]
        captions.append("" if rng.random() < caption_dropout else caption)
        metadata.append(line)
    return torch.stack(images), captions, metadata


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor `(3, H, W)` in [-1, 1], the range diffusers' VAEs expect."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prompt_sampler(lines: list[dict], seed: int):
    """A DDPO `prompt_fn() -> (prompt, metadata)` over metadata lines, seeded: a tag uniformly among those the lines
    have, then one of its prompts (so color_attr's many prompts do not crowd out counting); lines without a tag (plain
    prompts) are drawn uniformly."""
    rng = np.random.default_rng(seed)
    tags = sorted({line["tag"] for line in lines}) if all("tag" in line for line in lines) else None

    def prompt_fn():
        line = sample_metadata(rng, lines, tags=tags) if tags else lines[int(rng.integers(len(lines)))]
        return line["prompt"], line

    return prompt_fn
