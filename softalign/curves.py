"""Training curves as a small PNG drawn with PIL alone (no plotting library is a dependency)."""

from __future__ import annotations

import os

# Distinct on white and for the common colour blindnesses (Okabe and Ito's palette).
SERIES_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]


def plot_curves(curves: dict, path: str | os.PathLike) -> None:
    """One panel per curve, value against step: `curves` maps a title to `[{"step": s, "value": v}, ...]`, or to
    `{series name: [points], ...}` to draw several lines in one panel (with a legend; the same name keeps the same
    colour in every panel). Empty curves are left out."""
    from PIL import Image, ImageDraw

    panels = []
    for title, given in curves.items():
        series = given if isinstance(given, dict) else {"": given}
        series = {name: points for name, points in series.items() if points}
        if series:
            panels.append((title, series))
    names = list(dict.fromkeys(name for _, series in panels for name in series if name))
    colors = {name: SERIES_COLORS[i % len(SERIES_COLORS)] for i, name in enumerate(names)}
    colors[""] = SERIES_COLORS[0]
    width, legend = 360, 14 * len(names)
    height = 220 + legend
    canvas = Image.new("RGB", (width * max(1, len(panels)), height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, series) in enumerate(panels):
        x0, y0, w, h = p * width + 40, 30, width - 60, 150
        every = [pt for points in series.values() for pt in points]
        xs, ys = [pt["step"] for pt in every], [pt["value"] for pt in every]
        lo, hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
        left, span = min(xs), (max(xs) - min(xs)) or 1
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        draw.text((x0, 8), title, fill="black")
        draw.text((x0 - 35, y0), f"{hi:.3g}", fill="black")
        draw.text((x0 - 35, y0 + h - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y0 + h + 5), f"step {min(xs)}..{max(xs)}", fill="black")
        for name, points in series.items():
            line = [(x0 + w * (pt["step"] - left) / span, y0 + h - h * (pt["value"] - lo) / (hi - lo)) for pt in points]
            if len(line) > 1:
                draw.line(line, fill=colors[name], width=2)
            for x, y in line:  # the points themselves: curves are sparse (one every few hundred steps)
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors[name])
    for i, name in enumerate(names):  # one legend for the figure, under the panels
        y = 220 + 14 * i - 8
        draw.line([(40, y + 6), (60, y + 6)], fill=colors[name], width=3)
        draw.text((66, y), name, fill="black")
    canvas.save(path)
