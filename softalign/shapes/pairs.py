"""Training pairs made in the shapes world: image-caption pairs for SoftAlign, preference pairs for Diffusion-DPO."""

from __future__ import annotations

import numpy as np
import torch


def shapes_pairs(n: int, seed: int, count_groups: float = 0.0, group: int = 4) -> list[tuple]:
    """`n` renders of training-split prompts as `(image, caption)` pairs, in groups of `group` (each image's candidate
    captions): a share `count_groups` of the groups are one class at different counts (hard negatives, to be kept
    whole with `SoftAlignConfig(keep_groups=True)`), the rest tag-uniform draws.

    Args:
        n (`int`): number of pairs (a multiple of `group` is used).
        seed (`int`): seed of the prompt draws and renders.
        count_groups (`float`, *optional*, defaults to 0.0): share of hard-negative count groups.
        group (`int`, *optional*, defaults to 4): `negatives_per_positive + 1`.
    """
    from .data import count_group, sample_metadata
    from .prompts import split_prompts
    from .render import render_scene

    rng = np.random.default_rng(seed)
    lines = split_prompts("train")
    pairs = []
    for _ in range(n // group):
        hard = count_groups and rng.random() < count_groups  # no draw at 0: the same renders as without groups
        members = count_group(rng, lines, group) if hard else None
        for i in range(group):
            line = members[i] if hard else sample_metadata(rng, lines)  # drawn just before its render, as ever
            pairs.append((render_scene(line, rng)[0], line["prompt"]))
    return pairs


def preference_pairs(
    pipe,
    lines: list[dict],
    detector,
    seed: int = 0,
    sample_steps: int = 20,
    guidance_scale: float = 5.0,
    limit: int = 64,
) -> list[dict]:
    """Diffusion-DPO rows `{"caption", "chosen", "rejected"}`: preferred, a render of the prompt; rejected, one of the
    model's samples that fails GenEval's rules (prompts that the model already gets right give no pair).

    Args:
        pipe: the pipeline whose failures become the rejected images.
        lines (`list[dict]`): shapes metadata lines (`split_prompts("train")`).
        detector: a shapes detector (`ShapesDetector.load()`).
        seed (`int`, *optional*, defaults to 0): seed of the prompt choice and the renders.
        sample_steps (`int`, *optional*, defaults to 20) and guidance_scale (`float`, *optional*, defaults to 5.0):
            how the model samples.
        limit (`int`, *optional*, defaults to 64): prompts tried.
    """
    from ..eval.rules import evaluate_detections
    from .render import render_scene

    rng = np.random.default_rng(seed)
    pairs = []
    for index in rng.permutation(len(lines))[:limit]:
        line = lines[int(index)]
        image = pipe(
            line["prompt"],
            num_inference_steps=sample_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(int(index)),
        ).images[0]
        if not evaluate_detections(detector(image), line)[0]:
            pairs.append({"caption": line["prompt"], "chosen": render_scene(line, rng)[0], "rejected": image})
    return pairs
