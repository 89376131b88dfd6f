"""Train the shapes-world detector's crop classifier on degraded renders, fit its temperature, and save it.

    python scripts/train_shapes_detector.py [--seed 0] [--out softalign/shapes/detector.safetensors]

Scenes take their layout from `render_scene` (any prompt, wider object sizes) and are redrawn object by object with
what a small diffusion model gets wrong: rounded corners (alpha blurred, then re-thresholded), wobbly outlines, small
rotations and aspect changes, blobby outlines, off colours and two-colour blended fills (the dominant colour names
the object), soft halos, off-colour tails and faint yellowish speckle, then image-wide blur, down-up sampling, noise
and an off-white background.
`junk` is drawn on purpose: bitten fragments, elongated blobs, strokes, crescents, faint smudges, and shapes touching
a partner (one component, two objects). A share of scenes keeps the exact clean render. Crops come from the
detector's own segmentation (and its splitting of junk components), so training sees what inference sees; each
component is labelled by its overlap with the drawn objects. Deterministic from `--seed`; one thread.
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

from softalign.shapes import detector as det
from softalign.shapes.prompts import all_prompts
from softalign.shapes.render import SceneObject, _shape_polygon, render_scene  # the renderer's own geometry
from softalign.shapes.vocabulary import COLORS, SHAPES

SS = 4  # supersampling of object masks, as the renderer
# Max corner blur (share of the side) and max rotation (degrees) of each shape as a small generator draws it.
ROUNDING = {"circle": 0.10, "square": 0.20, "triangle": 0.16, "star": 0.11, "heart": 0.12, "cross": 0.12}
ROTATION = {"circle": 0.0, "square": 12.0, "triangle": 12.0, "star": 15.0, "heart": 12.0, "cross": 12.0}
JUNK = len(det.CLASSES) - 1


def turn(points, cx, cy, angle=0.0, stretch=1.0, wobble=0.0, rng=None) -> list[tuple[float, float]]:
    """Points stretched (x by `stretch`, y by its inverse), rotated about (cx, cy), then jittered by `wobble`."""
    cos, sin, out = math.cos(angle), math.sin(angle), []
    for x, y in points:
        dx, dy = (x - cx) * stretch, (y - cy) / stretch
        jitter = rng.normal(0, wobble, 2) if wobble else (0.0, 0.0)
        out.append((cx + dx * cos - dy * sin + jitter[0], cy + dx * sin + dy * cos + jitter[1]))
    return out


def coverage(size: int, ops, box, rounding: float = 0.0, threshold: float = 0.5) -> np.ndarray:
    """Pixel coverage in [0, 1] of drawing `ops` at 4x on a patch around `box` (image coordinates).

    `ops`: `("polygon", points)`, `("ellipse", (cx, cy, rx, ry))` or `("line", points, width)`. Rounding blurs the 4x
    mask and re-thresholds it: corners and thin tips shrink and round off, as a generator draws them.
    """
    pad = int(math.ceil(3 * rounding)) + 3
    x0, y0 = max(0, int(box[0]) - pad), max(0, int(box[1]) - pad)
    x1, y1 = min(size, int(math.ceil(box[2])) + pad), min(size, int(math.ceil(box[3])) + pad)
    alpha = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    patch = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    draw = ImageDraw.Draw(patch)

    def scaled(points):
        return [((x - x0) * SS, (y - y0) * SS) for x, y in points]

    for op in ops:
        if op[0] == "polygon":
            draw.polygon(scaled(op[1]), fill=255)
        elif op[0] == "ellipse":
            cx, cy, rx, ry = op[1]
            draw.ellipse(scaled([(cx - rx, cy - ry), (cx + rx, cy + ry)]), fill=255)
        else:
            draw.line(scaled(op[1]), fill=255, width=max(1, int(op[2] * SS)), joint="curve")
    if rounding > 0.05:
        blurred = patch.filter(ImageFilter.GaussianBlur(float(rounding * SS)))
        patch = blurred.point(lambda v: 255 if v > threshold * 255 else 0)
    big = np.asarray(patch, np.float32) / 255.0
    alpha[y0:y1, x0:x1] = big.reshape(y1 - y0, SS, x1 - x0, SS).mean(axis=(1, 3))
    return alpha


def shape_alpha(size: int, label: str, box, rng, degrade: bool) -> np.ndarray:
    """A shape's coverage; when `degrade`, rotated, stretched, wobbled and maybe with rounded corners."""
    cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
    points = _shape_polygon(label, cx, cy, half)
    if points is None:  # circle as a 48-gon, so that it can be stretched and wobbled like the others
        points = [(cx + half * math.cos(t), cy + half * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, False)]
    if not degrade:
        return coverage(size, [("polygon", points)], box)
    angle = math.radians(rng.uniform(-1, 1) * ROTATION[label])
    if rng.random() < 0.4:  # a generator's blobby outline: slow radial bulges, edges subdivided so that they bend
        points = blobby(densify(points, 6), cx, cy, rng.uniform(0.02, 0.07), rng)
    wobble = rng.uniform(0, 0.07) * half if rng.random() < 0.5 else 0.0
    points = turn(points, cx, cy, angle, math.exp(rng.uniform(-0.12, 0.12)), wobble, rng)
    rounding = rng.uniform(0, ROUNDING[label]) * 2 * half if rng.random() < 0.7 else 0.0
    return coverage(size, [("polygon", points)], box, rounding, rng.uniform(0.4, 0.6))


def densify(points, k: int) -> list[tuple[float, float]]:
    """Each polygon edge cut into `k` segments."""
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        out += [(x0 + (x1 - x0) * i / k, y0 + (y1 - y0) * i / k) for i in range(k)]
    return out


def blobby(points, cx, cy, amount: float, rng) -> list[tuple[float, float]]:
    """Points pushed in and out from (cx, cy) by a sum of two slow angular waves of relative size `amount`."""
    waves = [(int(rng.integers(2, 5)), rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)) for _ in range(2)]
    norm = sum(w for _, _, w in waves)
    out = []
    for x, y in points:
        t = math.atan2(y - cy, x - cx)
        scale = 1 + amount * sum(w * math.sin(k * t + p) for k, p, w in waves) / norm
        out.append((cx + (x - cx) * scale, cy + (y - cy) * scale))
    return out


def junk_alpha(size: int, box, rng) -> np.ndarray:
    """A component no detector should name: a bitten fragment, an elongated blob, a stroke or a crescent."""
    kind = rng.choice(["fragment", "fragment", "blob", "stroke", "crescent"])
    side, cx, cy = box[2] - box[0], (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if kind == "fragment":  # round bites out of a shape, 20-60% left: a straight cut of a triangle is a triangle
        whole = shape_alpha(size, str(rng.choice(SHAPES)), box, rng, degrade=True)
        for _ in range(20):
            bitten = whole.copy()
            for _ in range(int(rng.integers(1, 3))):
                r, t = rng.uniform(0.35, 0.7) * side, rng.uniform(0, 2 * math.pi)
                bitten *= 1 - coverage(
                    size, [("ellipse", (cx + side / 2 * math.cos(t), cy + side / 2 * math.sin(t), r, r))], box
                )
            if 0.2 <= bitten.sum() / max(whole.sum(), 1e-6) <= 0.6:
                break
        return bitten
    if kind == "blob":  # an ellipse far too long to be a circle
        a, b = side / 2, side / 2 / rng.uniform(1.8, 3.5)
        points = [(cx + a * math.cos(t), cy + b * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, False)]
        return coverage(size, [("polygon", turn(points, cx, cy, rng.uniform(0, math.pi)))], box)
    if kind == "stroke":  # a thick bent line
        points = [(cx + rng.uniform(-0.5, 0.5) * side, cy + rng.uniform(-0.5, 0.5) * side) for _ in range(3)]
        return coverage(size, [("line", points, rng.uniform(0.12, 0.3) * side)], box)
    r, t, d = side / 2, rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 0.6) * side  # a disc minus an offset disc
    disc = coverage(size, [("ellipse", (cx, cy, r, r))], box)
    return disc * (1 - coverage(size, [("ellipse", (cx + d * math.cos(t), cy + d * math.sin(t), r, r))], box))


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
    size = int(rng.choice([64] * 15 + [48] * 2 + [32] + [96] * 2))  # mostly 64 px, some other sizes
    lo = rng.uniform(0.13, 0.2) * size
    clean, layout = render_scene(
        lines[int(rng.integers(len(lines)))], rng, size, lo, lo + rng.uniform(0.05, 0.16) * size
    )
    if rng.random() < 0.15:  # the exact clean render
        return np.array(clean), [(o.label, shape_alpha(size, o.label, o.box, rng, False)) for o in layout]
    objects = list(layout)
    if rng.random() < 0.3:  # a partner touching or overlapping one object: one component, two objects
        base = objects[int(rng.integers(len(objects)))]
        side, t = rng.uniform(0.13, 0.3) * size, rng.uniform(0, 2 * math.pi)
        dist = ((base.box[2] - base.box[0]) + side) / 2 * rng.uniform(0.55, 1.0)
        cx = (base.box[0] + base.box[2]) / 2 + dist * math.cos(t) - side / 2
        cy = (base.box[1] + base.box[3]) / 2 + dist * math.sin(t) - side / 2
        color = base.color if rng.random() < 0.5 else str(rng.choice(list(COLORS)))
        objects.append(SceneObject(str(rng.choice(SHAPES)), color, (cx, cy, cx + side, cy + side)))
    drawn = []
    for o in objects:
        alpha = shape_alpha(size, o.label, o.box, rng, True)
        drawn.append((o.label, alpha, fill(size, o.color, o.box, rng)))
    boxes = [o.box for o in objects]
    for _ in range(int(rng.integers(0, 3))):
        box = free_box(size, rng.uniform(0.12, 0.3) * size, boxes, rng)
        if box is not None:
            boxes.append(box)
            drawn.append(("junk", junk_alpha(size, box, rng), off_color(str(rng.choice(list(COLORS))), rng)))
    if rng.random() < 0.4:  # a faint smudge: mostly under the ink threshold, sometimes a faint component
        r, (x, y) = rng.uniform(0.08, 0.25) * size, rng.uniform(0, size, 2)
        smudge = coverage(size, [("ellipse", (x, y, r, r * rng.uniform(0.4, 1)))], (x - r, y - r, x + r, y + r))
        smudge = Image.fromarray((smudge * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(float(r / 3)))
        tint = rng.uniform(60, 200, 3) if rng.random() < 0.5 else off_color("red", rng)
        drawn.append(("junk", np.asarray(smudge, np.float32) / 255 * rng.uniform(0.1, 0.55), tint))
    image = np.full((size, size, 3), 255.0, np.float32)
    visible = []
    halo = rng.random() < 0.4  # a soft glow around every object, under the ink threshold; image only, not labelled
    for kind, alpha, rgb in drawn:
        if halo and kind != "junk" or rng.random() < 0.1:
            glow = np.asarray(
                Image.fromarray((alpha * 255).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(float(rng.uniform(1.0, 3.0) * size / 64))
                ),
                np.float32,
            )
            glow = glow / 255 * rng.uniform(0.15, 0.45)
            image = image * (1 - glow[..., None]) + rgb * glow[..., None]
        image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
        visible = [(k, a * (1 - alpha)) for k, a in visible] + [(kind, alpha)]  # later objects occlude earlier ones
    if rng.random() < 0.25:  # a thin off-colour tail from an object's edge: part of that object's component
        kind, alpha, _ = drawn[int(rng.integers(len(drawn)))]
        ys, xs = np.nonzero(alpha > 0.5)
        if len(ys):
            i, t = int(rng.integers(len(ys))), rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.04, 0.12) * size
            line = [(xs[i], ys[i]), (xs[i] + length * math.cos(t), ys[i] + length * math.sin(t))]
            box = (min(p[0] for p in line), min(p[1] for p in line), max(p[0] for p in line), max(p[1] for p in line))
            tail = coverage(size, [("line", line, rng.uniform(0.8, 2.0) * size / 64)], box) * rng.uniform(0.4, 0.9)
            image = image * (1 - tail[..., None]) + off_color(str(rng.choice(list(COLORS))), rng) * tail[..., None]
    if rng.random() < 0.5:
        image = speckle(image, size, rng)
    return degrade_image(image, size, rng), visible


def fill(size: int, name: str, box, rng) -> np.ndarray:
    """An object's colour: mostly flat, sometimes a linear blend into a second palette colour that covers less than
    half of it (the dominant colour names the object)."""
    base = off_color(name, rng)
    if rng.random() > 0.3:
        return base
    other = off_color(str(rng.choice([c for c in COLORS if c != name])), rng)
    cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max((box[2] - box[0]) / 2, 1.0)
    t = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    proj = ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)) / half  # -1 .. 1 across the object
    weight = np.clip((proj - rng.uniform(0.05, 0.6)) / rng.uniform(0.2, 0.8) + 0.5, 0, 1) * rng.uniform(0.6, 1.0)
    return base * (1 - weight[..., None]) + other * weight[..., None]


def speckle(image: np.ndarray, size: int, rng) -> np.ndarray:
    """Faint yellowish specks and short streaks scattered over the image, a generator's texture noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amount = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 30))):
        x, y = rng.uniform(0, size, 2)
        sx, sy = rng.uniform(0.4, 1.2, 2) * size / 64 * (np.array([rng.uniform(1, 3), 1]) if rng.random() < 0.3 else 1)
        amount = np.maximum(
            amount, rng.uniform(0.2, 0.7) * np.exp(-((xx - x) ** 2) / (2 * sx**2) - (yy - y) ** 2 / (2 * sy**2))
        )
    tint = np.array([rng.uniform(220, 255), rng.uniform(180, 235), rng.uniform(40, 160)], np.float32)
    return image * (1 - amount[..., None]) + tint * amount[..., None]


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
    """Class index of a component from its overlap with the drawn objects; None where ambiguous (not trained on).

    One shape, mostly covered and not much more: that shape. Two objects, any junk object, or nothing: junk.
    A shape covered less than 45% is a fragment (junk); between 45% and 75% is left out.
    """
    area, involved = mask.sum(), []
    for kind, alpha in visible:
        footprint = alpha > 0.5
        inter, full = (mask & footprint).sum(), footprint.sum()
        if inter >= 0.2 * area if kind == "junk" else (inter >= 0.25 * max(full, 1) or inter >= 0.25 * area):
            involved.append((kind, inter, full))
    if len(involved) != 1 or involved[0][0] == "junk":
        return JUNK
    kind, inter, full = involved[0]
    cover = inter / max(full, 1)
    if cover >= 0.75 and area <= 1.5 * full:
        return det.CLASSES.index(kind)
    return JUNK if cover < 0.45 else None


def build_set(n_scenes: int, seed: int, config: det.DetectorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lines = [line for _, line in all_prompts()]
    crops, labels = [], []
    for _ in range(n_scenes):
        rgb, visible = make_scene(rng, lines)
        ink, components = det.find_components(rgb, config)
        keep = [(c, y) for c in components if (y := label_component(c.mask, visible)) is not None]
        for c, y in list(keep):  # inference splits junk components that may be touching objects: train on the parts
            if y == JUNK:
                parts = det.split_touching(rgb, ink, c, config)
                keep += [(p, y) for p in parts if (y := label_component(p.mask, visible)) is not None]
        if keep:
            crops.append(det.crop_inputs(ink, [c for c, _ in keep], config))
            labels += [y for _, y in keep]
    return torch.cat(crops), torch.tensor(labels)


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top-class probability, equal-width bins."""
    conf, pred = probs.max(1)
    edges, total = torch.linspace(0, 1, bins + 1), 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.float().mean() * abs((pred[inside] == labels[inside]).float().mean() - conf[inside].mean())
    return float(total)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature of least NLL, by grid search (one parameter: a grid is exact enough and deterministic)."""
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 400))
    return float(grid[int(torch.stack([F.cross_entropy(logits / t, labels) for t in grid]).argmin())])


def train(model, x_train, y_train, x_val, y_val, args, start: float) -> None:
    steps = args.epochs * math.ceil(len(y_train) / args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # every shape is left-right symmetric
            x = torch.where(flip[:, None, None, None], x_train[idx].flip(3), x_train[idx])
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_val).argmax(1) == y_val).float().mean()
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} val acc {acc:.4f} ({time.perf_counter() - start:.0f}s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-scenes", type=int, default=30000)
    parser.add_argument("--val-scenes", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=det.DEFAULT_PATH)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; more threads only contend
    torch.manual_seed(args.seed)
    start, cpu = time.perf_counter(), time.process_time()
    config = det.DetectorConfig()
    x_train, y_train = build_set(args.train_scenes, args.seed, config)
    x_val, y_val = build_set(args.val_scenes, args.seed + 1_000_003, config)
    counts = dict(zip(det.CLASSES, torch.bincount(y_train, minlength=len(det.CLASSES)).tolist(), strict=True))
    print(
        f"data: {len(y_train)} train / {len(y_val)} val crops {counts} ({time.perf_counter() - start:.0f}s)", flush=True
    )
    model = det.ShapesNet(config)
    train(model, x_train, y_train, x_val, y_val, args, start)
    with torch.no_grad():
        logits = model(x_val)
    half = len(y_val) // 2  # fit the temperature on one half, report calibration on the other
    temperature = fit_temperature(logits[:half], y_val[:half])
    pred = logits.argmax(1)
    stats = {
        "val_accuracy": f"{(pred == y_val).float().mean():.4f}",
        "ece_before": f"{ece(torch.softmax(logits[half:], 1), y_val[half:]):.4f}",
        "ece_after": f"{ece(torch.softmax(logits[half:] / temperature, 1), y_val[half:]):.4f}",
    }
    print(f"val accuracy {stats['val_accuracy']}; temperature {temperature:.3f}")
    print(f"ECE (held-out half) before {stats['ece_before']} after {stats['ece_after']}")
    matrix = torch.zeros(len(det.CLASSES), len(det.CLASSES), dtype=torch.long)
    matrix.index_put_((y_val, pred), torch.ones_like(y_val), accumulate=True)
    print("confusion (rows truth, columns predicted):", *det.CLASSES)
    for name, row in zip(det.CLASSES, matrix.tolist(), strict=True):
        print(f"  {name:9s}", row)
    detector = det.ShapesDetector(model, det.DetectorConfig(**{**config.__dict__, "temperature": temperature}))
    trained = f"{len(y_train)} crops, {args.epochs} epochs"  # no timings: the same seed writes the same file
    detector.save(args.out, seed=str(args.seed), trained=trained, **stats)
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); {wall:.0f}s wall, {cpu_s:.0f}s CPU")


if __name__ == "__main__":
    main()
