"""Draw a scene that satisfies a GenEval metadata line: the training data and the detector's ground truth.

Objects never overlap; every `position` constraint holds under GenEval's own `relative_position` rule (so a render
of a position prompt is scored correct by a perfect detector); counts are exact, so counting's exclude clause holds.
Shapes are drawn at 4x resolution and downsampled, which gives soft, anti-aliased edges like a generator's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..eval.rules import relative_position  # GenEval's rule, so a render passes its own prompt
from .vocabulary import BACKGROUND, COLORS, SHAPES

SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its class, colour name and pixel box `(x0, y0, x1, y1)` (x1, y1 exclusive)."""

    label: str
    color: str
    box: tuple[float, float, float, float]


def _shape_polygon(label: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if label == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if label == "triangle":  # upright, filling the box
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if label == "star":  # five points, inner radius 0.45
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else 0.45 * half
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + 0.1 * half))
        return points
    if label == "cross":  # a plus sign, arms a third of the side wide
        w = half / 3
        return [
            (cx - w, cy - half), (cx + w, cy - half), (cx + w, cy - w), (cx + half, cy - w),
            (cx + half, cy + w), (cx + w, cy + w), (cx + w, cy + half), (cx - w, cy + half),
            (cx - w, cy + w), (cx - half, cy + w), (cx - half, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if label == "heart":  # the classic parametric heart, scaled to fill the box (point down)
        points = []
        for k in range(48):
            a = 2 * math.pi * k / 48
            x = 16 * math.sin(a) ** 3
            y = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
            points.append((cx + half * x / 16.5, cy - half * (y + 2.5) / 14.5))
        return points
    return None  # circle


def draw_scene(objects: list[SceneObject], size: int) -> Image.Image:
    """Render objects on the white background, anti-aliased."""
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in objects:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj.box)
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        polygon = _shape_polygon(obj.label, cx, cy, half)
        if polygon is None:
            draw.ellipse([x0, y0, x1, y1], fill=COLORS[obj.color])
        else:
            draw.polygon(polygon, fill=COLORS[obj.color])
    return big.resize((size, size), Image.LANCZOS)


def _clauses(metadata: dict) -> list[dict]:
    clauses = metadata.get("include")
    if not isinstance(clauses, list) or not clauses:
        raise ValueError(f"metadata needs a non-empty 'include' list, got {clauses!r}.")
    for clause in clauses:
        if clause.get("class") not in SHAPES:
            raise ValueError(f"The shapes world draws {SHAPES}, not {clause.get('class')!r} (metadata {metadata}).")
        if clause.get("color") is not None and clause["color"] not in COLORS:
            raise ValueError(f"The shapes world colours are {tuple(COLORS)}, not {clause['color']!r}.")
    return clauses


def render_scene(
    metadata: dict,
    rng: np.random.Generator,
    size: int = 64,
    min_object: float | None = None,
    max_object: float | None = None,
    max_tries: int = 2000,
) -> tuple[Image.Image, list[SceneObject]]:
    """Draw a scene that satisfies `metadata` (GenEval format) and return it with its objects.

    Args:
        metadata (`dict`): a GenEval metadata line (`include` with `class`, `count`, optional `color` and `position`).
        rng (`np.random.Generator`): the only source of randomness (same seed, same image).
        size (`int`, *optional*, defaults to 64): image side in pixels.
        min_object, max_object (`float`, *optional*): object side range, default 18% to 28% of the image.
    """
    clauses = _clauses(metadata)
    min_object = min_object or 0.18 * size
    max_object = max_object or 0.28 * size
    for _ in range(max_tries):
        placed = _try_place(clauses, rng, size, min_object, max_object)
        if placed is not None:
            return draw_scene(placed, size), placed
    raise ValueError(f"Could not place the objects of {metadata.get('prompt', metadata)!r} in a {size}px image.")


def _try_place(clauses, rng, size, min_object, max_object) -> list[SceneObject] | None:
    by_clause: list[list[SceneObject]] = []
    placed: list[SceneObject] = []
    for clause in clauses:
        group = []
        for _ in range(int(clause["count"])):
            for _attempt in range(50):
                side = float(rng.uniform(min_object, max_object))
                x0, y0 = (float(v) for v in rng.uniform(1, size - side - 1, size=2))
                box = (x0, y0, x0 + side, y0 + side)
                if any(_overlaps(box, other.box, margin=2.0) for other in placed):
                    continue
                position = clause.get("position")
                if position and not all(
                    position[0] in relative_position(box, other.box) for other in by_clause[position[1]]
                ):
                    continue
                color = clause.get("color") or str(rng.choice(list(COLORS)))
                obj = SceneObject(clause["class"], color, box)
                group.append(obj)
                placed.append(obj)
                break
            else:
                return None
        by_clause.append(group)
    return placed


def _overlaps(a, b, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])
