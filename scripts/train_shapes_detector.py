"""Train the shapes-world detector's crop classifier on degraded renders, fit its temperature, and save it.

    python scripts/train_shapes_detector.py [--seed 0] [--out softalign/shapes/detector.safetensors]

Scenes take their layout from `render_scene` (any prompt, wider object sizes) and are redrawn object by object with
what a small diffusion model gets wrong: rounded corners (alpha blurred, then re-thresholded), wobbly outlines, small
rotations and aspect changes, off colours, then image-wide blur, down-up sampling, noise and an off-white background.
`junk` examples are drawn deliberately: bitten fragments, elongated blobs, strokes, crescents, faint smudges and
shapes touching a partner (a component that holds two objects). A share of scenes keeps the exact clean render.
Crops come from the detector's own segmentation, so training sees what inference sees; each component is labelled
by its overlap with the drawn objects. Deterministic from `--seed`; one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from softalign.shapes.detector import CLASSES, DEFAULT_PATH, DetectorConfig, ShapesDetector, ShapesNet, crop_inputs
from softalign.shapes.detector import find_components, split_by_color, split_by_ink
from softalign.shapes.prompts import all_prompts
from softalign.shapes.render import SceneObject, _shape_polygon, render_scene  # the renderer's own geometry
from softalign.shapes.vocabulary import COLORS, SHAPES

SS = 4  # supersampling of object masks, as the renderer
ROUNDING = {"circle": 0.10, "square": 0.14, "triangle": 0.10, "star": 0.06}  # max corner blur, share of the side
ROTATION = {"circle": 0.0, "square": 12.0, "triangle": 12.0, "star": 15.0}  # max degrees


def outline(label: str, cx: float, cy: float, half: float, rng, degrade: bool) -> list[tuple[float, float]]:
    """Polygon of a shape (circles as 48-gons), rotated, stretched and wobbled when `degrade`."""
    points = _shape_polygon(label, cx, cy, half)
    if points is None:
        points = [(cx + half * math.cos(t), cy + half * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, False)]
    if not degrade:
        return points
    angle = math.radians(rng.uniform(-1, 1) * ROTATION[label])
    stretch = math.exp(rng.uniform(-0.1, 0.1))
    wobble = rng.uniform(0, 0.05) * half if rng.random() < 0.5 else 0.0
    out = []
    for x, y in points:
        dx, dy = (x - cx) * stretch, (y - cy) / stretch
        dx, dy = dx * math.cos(angle) - dy * math.sin(angle), dx * math.sin(angle) + dy * math.cos(angle)
        out.append((cx + dx + rng.normal(0, 1) * wobble, cy + dy + rng.normal(0, 1) * wobble))
    return out


def coverage(size: int, draw_fn, box, rounding: float = 0.0, threshold: float = 0.5) -> np.ndarray:
    """Pixel coverage in [0, 1] of what `draw_fn(draw, origin)` paints, drawn at 4x on a patch around `box`.

    Rounding blurs the 4x mask and re-thresholds it: corners and thin tips shrink, as a generator draws them.
    """
    pad = int(math.ceil(3 * rounding)) + 3
    x0, y0 = max(0, int(box[0]) - pad), max(0, int(box[1]) - pad)
    x1, y1 = min(size, int(math.ceil(box[2])) + pad), min(size, int(math.ceil(box[3])) + pad)
    alpha = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    patch = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    draw_fn(ImageDraw.Draw(patch), (x0 * SS, y0 * SS))
    if rounding > 0.05:
        patch = patch.filter(ImageFilter.GaussianBlur(float(rounding * SS))).point(lambda v: 255 if v > threshold * 255 else 0)
    big = np.asarray(patch, np.float32) / 255.0
    alpha[y0:y1, x0:x1] = big.reshape(y1 - y0, SS, x1 - x0, SS).mean(axis=(1, 3))
    return alpha


def shape_alpha(size, label, box, rng, degrade: bool) -> np.ndarray:
    cx, cy, half = (box[0] + box[2]) / 2 * SS, (box[1] + box[3]) / 2 * SS, (box[2] - box[0]) / 2 * SS
    points = outline(label, cx, cy, half, rng, degrade)
    rounding = rng.uniform(0, ROUNDING[label]) * (box[2] - box[0]) if degrade and rng.random() < 0.6 else 0.0
    return coverage(
        size, lambda d, o: d.polygon([(x - o[0], y - o[1]) for x, y in points], fill=255), box, rounding, rng.uniform(0.4, 0.6)
    )


def junk_alpha(size, box, rng) -> np.ndarray:
    """A component no shape detector should name: bitten fragment, elongated blob, stroke, crescent or smudge."""
    kind = rng.choice(["fragment", "fragment", "blob", "stroke", "crescent"])
    side = box[2] - box[0]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if kind == "fragment":  # a shape with round bites out of it, 20-60% left: never itself a clean shape
        whole = shape_alpha(size, str(rng.choice(SHAPES)), box, rng, degrade=True)
        for _ in range(20):
            bitten = whole.copy()
            for _ in range(int(rng.integers(1, 3))):
                r, t = rng.uniform(0.35, 0.7) * side, rng.uniform(0, 2 * math.pi)
                bx, by = cx + 0.5 * side * math.cos(t), cy + 0.5 * side * math.sin(t)
                bite = coverage(size, lambda d, o, bx=bx, by=by, r=r: d.ellipse(_ss_box(bx, by, r, r, o), fill=255), box)
                bitten *= 1.0 - bite
            if 0.2 <= bitten.sum() / max(whole.sum(), 1e-6) <= 0.6:
                return bitten
        return bitten
    if kind == "blob":  # an ellipse far too long to be a circle
        ratio, angle = rng.uniform(1.8, 3.5), rng.uniform(0, math.pi)
        a, b = side / 2, side / 2 / ratio
        pts = [(a * math.cos(t), b * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, False)]
        pts = [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)) for x, y in pts]
        return coverage(size, lambda d, o: d.polygon([((x * SS - o[0]), (y * SS - o[1])) for x, y in pts], fill=255), box)
    if kind == "stroke":  # a thick bent line
        pts = [(cx + rng.uniform(-0.5, 0.5) * side, cy + rng.uniform(-0.5, 0.5) * side) for _ in range(3)]
        width = max(1, int(rng.uniform(0.12, 0.3) * side * SS))
        return coverage(size, lambda d, o: d.line([(x * SS - o[0], y * SS - o[1]) for x, y in pts], 255, width, "curve"), box)
    r, t = side / 2, rng.uniform(0, 2 * math.pi)  # crescent: a disc minus an offset disc
    ox, oy = cx + rng.uniform(0.35, 0.6) * side * math.cos(t), cy + rng.uniform(0.35, 0.6) * side * math.sin(t)
    disc = coverage(size, lambda d, o: d.ellipse(_ss_box(cx, cy, r, r, o), fill=255), box)
    return disc * (1.0 - coverage(size, lambda d, o: d.ellipse(_ss_box(ox, oy, r, r, o), fill=255), box))


def _ss_box(x, y, rx, ry, origin):
    return [x * SS - rx * SS - origin[0], y * SS - ry * SS - origin[1], x * SS + rx * SS - origin[0], y * SS + ry * SS - origin[1]]


def free_box(size, side, boxes, rng, tries=30):
    for _ in range(tries):
        x0, y0 = rng.uniform(0, size - side, size=2)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1] for b in boxes):
            return box
    return None


def off_color(name: str, rng) -> np.ndarray:
    rgb = np.array(COLORS[name], np.float32) + rng.normal(0, 12, 3)
    if rng.random() < 0.3:  # washed out or darker
        rgb = 255 - (255 - rgb) * rng.uniform(0.7, 1.1)
    return np.clip(rgb, 0, 255)


def make_scene(rng, lines) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One image (H x W x 3 uint8) and its drawn objects `(kind, visible coverage)`, kind a shape or `junk`."""
    size = int(rng.choice([64] * 15 + [48] * 2 + [32] + [96] * 2))
    line = lines[int(rng.integers(len(lines)))]
    lo = rng.uniform(0.13, 0.2) * size
    clean_image, layout = render_scene(line, rng, size, min_object=lo, max_object=lo + rng.uniform(0.05, 0.16) * size)
    if rng.random() < 0.15:  # the exact clean render
        return np.asarray(clean_image).copy(), [(o.label, shape_alpha(size, o.label, o.box, rng, False)) for o in layout]
    objects = list(layout)
    if rng.random() < 0.3:  # a partner touching or overlapping one object: one component, two objects
        base = objects[int(rng.integers(len(objects)))]
        side, t = rng.uniform(0.13, 0.3) * size, rng.uniform(0, 2 * math.pi)
        dist = ((base.box[2] - base.box[0]) + side) / 2 * rng.uniform(0.55, 1.0)
        cx = (base.box[0] + base.box[2]) / 2 + dist * math.cos(t)
        cy = (base.box[1] + base.box[3]) / 2 + dist * math.sin(t)
        color = base.color if rng.random() < 0.5 else str(rng.choice(list(COLORS)))
        objects.append(SceneObject(str(rng.choice(SHAPES)), color, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)))
    drawn = [(o.label, shape_alpha(size, o.label, o.box, rng, True), off_color(o.color, rng)) for o in objects]
    boxes = [o.box for o in objects]
    for _ in range(int(rng.integers(0, 3))):
        box = free_box(size, rng.uniform(0.12, 0.3) * size, boxes, rng)
        if box is not None:
            boxes.append(box)
            drawn.append(("junk", junk_alpha(size, box, rng), off_color(str(rng.choice(list(COLORS))), rng)))
    if rng.random() < 0.4:  # a faint smudge: mostly under the ink threshold, sometimes a faint component
        r, (x, y) = rng.uniform(0.08, 0.25) * size, rng.uniform(0, size, 2)
        smudge = coverage(size, lambda d, o: d.ellipse(_ss_box(x, y, r, r * rng.uniform(0.4, 1), o), fill=255), (x - r, y - r, x + r, y + r))
        smudge = np.asarray(Image.fromarray((smudge * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(float(r / 3))), np.float32) / 255
        drawn.append(("junk", smudge * rng.uniform(0.1, 0.55), rng.uniform(60, 200, 3) if rng.random() < 0.5 else off_color("red", rng)))
    image = np.full((size, size, 3), 255.0, np.float32)
    visible = []
    for kind, alpha, rgb in drawn:
        image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
        visible = [(k, a * (1 - alpha)) for k, a in visible] + [(kind, alpha)]  # later objects occlude earlier ones
    return degrade_image(image, size, rng), visible


def degrade_image(image: np.ndarray, size: int, rng) -> np.ndarray:
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:  # a VAE's lost detail
        pil = pil.resize((size // 2, size // 2), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.8:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.4) * size / 64)))
    out = np.asarray(pil, np.float32)
    out = 255 - (255 - out) * rng.uniform(0.85, 1.1) - rng.uniform(0, 15) * (rng.random() < 0.3)
    out = out + rng.normal(0, 4, 3) + rng.normal(0, rng.uniform(0, 12), out.shape) * (rng.random() < 0.7)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def label_component(mask: np.ndarray, visible) -> int | None:
    """Class index of a component from its overlap with the drawn objects; None where ambiguous (not trained on)."""
    area = mask.sum()
    involved = []
    for kind, alpha in visible:
        footprint = alpha > 0.5
        inter = (mask & footprint).sum()
        if kind == "junk":
            if inter >= 0.2 * area:
                involved.append((kind, inter, footprint.sum()))
        elif inter >= 0.25 * max(footprint.sum(), 1) or inter >= 0.25 * area:
            involved.append((kind, inter, footprint.sum()))
    if len(involved) != 1 or involved[0][0] == "junk":
        return len(CLASSES) - 1
    kind, inter, full = involved[0]
    cover = inter / max(full, 1)
    if cover >= 0.75 and area <= 1.5 * full:
        return CLASSES.index(kind)
    return len(CLASSES) - 1 if cover < 0.45 else None


def build_set(n_scenes: int, seed: int, config: DetectorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lines = [line for _, line in all_prompts()]
    crops, labels = [], []
    for _ in range(n_scenes):
        rgb, visible = make_scene(rng, lines)
        ink, components = find_components(rgb, config)
        keep = [(c, y) for c in components if (y := label_component(c.mask, visible)) is not None]
        for c, y in list(keep):  # inference splits junk components that may be touching objects: train on the parts
            if y == len(CLASSES) - 1:
                parts = split_by_color(rgb, ink, c, config) or split_by_ink(rgb, ink, c, config)
                keep += [(p, y) for p in parts if (y := label_component(p.mask, visible)) is not None]
        if keep:
            crops.append(crop_inputs(ink, [c for c, _ in keep], config))
            labels += [y for _, y in keep]
    return torch.cat(crops), torch.tensor(labels)


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top-class probability, equal-width bins."""
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.float().mean() * abs((pred[inside] == labels[inside]).float().mean() - conf[inside].mean())
    return float(total)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 400))
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[int(nll.argmin())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-scenes", type=int, default=12000)
    parser.add_argument("--val-scenes", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start, cpu = time.perf_counter(), time.process_time()
    config = DetectorConfig()
    x_train, y_train = build_set(args.train_scenes, args.seed, config)
    x_val, y_val = build_set(args.val_scenes, args.seed + 1_000_003, config)
    counts = torch.bincount(y_train, minlength=len(CLASSES)).tolist()
    print(f"data: {len(y_train)} train / {len(y_val)} val crops {dict(zip(CLASSES, counts))} ({time.perf_counter() - start:.0f}s)")
    model = ShapesNet(config)
    steps = args.epochs * math.ceil(len(y_train) / args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            x = x_train[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # every shape is left-right symmetric
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_val).argmax(1) == y_val).float().mean()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} val acc {acc:.4f} ({time.perf_counter() - start:.0f}s)")
    with torch.no_grad():
        logits = model(x_val)
    half = len(y_val) // 2  # fit on one half, report calibration on the other
    temperature = fit_temperature(logits[:half], y_val[:half])
    before, after = torch.softmax(logits[half:], 1), torch.softmax(logits[half:] / temperature, 1)
    pred = logits.argmax(1)
    print(f"val accuracy {(pred == y_val).float().mean():.4f}; temperature {temperature:.3f}")
    print(f"ECE (held-out half) before {ece(before, y_val[half:]):.4f} after {ece(after, y_val[half:]):.4f}")
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    matrix.index_put_((y_val, pred), torch.ones_like(y_val), accumulate=True)
    print("confusion (rows truth, columns predicted):", *CLASSES)
    for name, row in zip(CLASSES, matrix.tolist(), strict=True):
        print(f"  {name:9s}", row)
    detector = ShapesDetector(model, DetectorConfig(**{**config.__dict__, "temperature": temperature}))
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    detector.save(args.out, seed=str(args.seed), trained=f"{len(y_train)} crops, {args.epochs} epochs, {wall:.0f}s wall")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); {wall:.0f}s wall, {cpu_s:.0f}s CPU")


if __name__ == "__main__":
    main()
