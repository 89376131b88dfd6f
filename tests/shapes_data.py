"""A tiny image-caption set drawn from the shapes world, shared by the trainer tests."""

import numpy as np

from softalign.shapes.prompts import split_prompts
from softalign.shapes.render import render_scene


def shapes_pairs(n: int = 16, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    lines = split_prompts("train")
    picks = [lines[int(i)] for i in rng.choice(len(lines), size=n, replace=False)]
    return [(render_scene(line, rng, size=size)[0], line["prompt"]) for line in picks]
