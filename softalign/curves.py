"""Training curves as a small PNG drawn with PIL alone (no plotting library is a dependency)."""

from __future__ import annotations

import os


def plot_curves(curves: dict, path: str | os.PathLike) -> None:
    """One panel per curve, value against step: `curves` maps a title to `[{"step": s, "value": v}, ...]`."""
    from PIL import Image, ImageDraw

    panels = [(name, points) for name, points in curves.items() if points]
    width, height = 360, 220
    canvas = Image.new("RGB", (width * max(1, len(panels)), height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (name, points) in enumerate(panels):
        x0, y0, w, h = p * width + 40, 30, width - 60, height - 70
        xs, ys = [pt["step"] for pt in points], [pt["value"] for pt in points]
        lo, hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        draw.text((x0, 8), name, fill="black")
        draw.text((x0 - 35, y0), f"{hi:.3g}", fill="black")
        draw.text((x0 - 35, y0 + h - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y0 + h + 5), f"step {min(xs)}..{max(xs)}", fill="black")
        span = max(xs) - min(xs) or 1
        line = [(x0 + w * (x - min(xs)) / span, y0 + h - h * (y - lo) / (hi - lo)) for x, y in zip(xs, ys, strict=True)]
        if len(line) > 1:
            draw.line(line, fill="blue", width=2)
    canvas.save(path)
