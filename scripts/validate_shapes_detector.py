"""Validate the shapes-world detector: GenEval verdicts with it against verdicts with the true objects.

    python scripts/validate_shapes_detector.py [--seeds 3] [--weights PATH] [--json out.json]

Every prompt of both splits is rendered with several seeds. A render satisfies its prompt by construction, so the
verdict with the ground-truth objects (score 1, true box and colour) is always `correct`; the detector should agree.
The same images are scored again after degradations like a generator's (blur, noise, colour shift, soft corners),
which the detector's training never drew in this form. A third set puts the two objects of each two-object prompt
side by side, from 1 px overlap to 1 px gap (one render per prompt): touching objects of different colours are split
by colour, same-coloured ones only where a neck separates them, so this set shows what merging costs.

Also reported: a component-level confusion matrix (components matched to true objects by box IoU >= 0.3), colour
accuracy, the share of true objects found with the right label and score > 0.9 (what counting needs), and the
detector's time per batch of 64 images on one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

from softalign.eval import Detection, evaluate_detections
from softalign.shapes.detector import CLASSES, ShapesDetector
from softalign.shapes.prompts import split_prompts
from softalign.shapes.render import SceneObject, draw_scene, render_scene
from softalign.shapes.vocabulary import COLORS, SHAPES

# A star fills only ~0.95 x 0.9 of its drawn box and soft corners shrink its tips further, so a right detection can
# fall near IoU 0.5 with the box; renders never overlap (2 px margin), so 0.3 cannot pair the wrong objects.
MIN_IOU = 0.3


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur and noise, or soft corners (a strong blur, then the ink re-sharpened around one half)."""
    rgb = np.asarray(image, np.float32)
    if rng.random() < 0.5:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0)))), np.float32)
    else:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 1.3)))), np.float32)
        ink = (255 - blurred.min(axis=2, keepdims=True)) / 255
        sharp = 1 / (1 + np.exp(-10 * (ink - 0.45)))  # a soft step: corners stay round, edges get crisp again
        blurred = 255 - (255 - blurred) * sharp / np.maximum(ink, 1e-3) * 0.9
    out = blurred + rng.normal(0, 5, 3) + rng.normal(0, rng.uniform(2, 10), rgb.shape)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def touching_scene(line: dict, rng: np.random.Generator, size: int = 64):
    """The two objects of a two-object prompt side by side (or one above the other), from 1 px overlap to 1 px gap."""
    (a, b), colors = line["include"], list(COLORS)
    sides = rng.uniform(0.18, 0.28, 2) * size
    gap, shift = rng.uniform(-1, 1), rng.uniform(-0.3, 0.3) * sides.min()
    x0, y0 = rng.uniform(1, size - sides.sum() - 2), rng.uniform(1 + abs(shift), size - sides.max() - 1 - abs(shift))
    first = (x0, y0, x0 + sides[0], y0 + sides[0])
    second = (first[2] + gap, y0 + shift, first[2] + gap + sides[1], y0 + shift + sides[1])
    if rng.random() < 0.5:  # one above the other: transpose both boxes
        first, second = (first[1], first[0], first[3], first[2]), (second[1], second[0], second[3], second[2])
    objects = [
        SceneObject(clause["class"], clause.get("color") or colors[int(rng.integers(len(colors)))], box)
        for clause, box in ((a, first), (b, second))
    ]
    return draw_scene(objects, size), objects


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def match(components, objects) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Greedy one-to-one matching by IoU >= MIN_IOU: pairs (component, object), unmatched components and objects."""
    pairs = sorted(
        ((iou(c.box, o.box), i, j) for i, c in enumerate(components) for j, o in enumerate(objects)), reverse=True
    )
    used_c, used_o, matched = set(), set(), []
    for value, i, j in pairs:
        if value >= MIN_IOU and i not in used_c and j not in used_o:
            used_c.add(i), used_o.add(j), matched.append((i, j))
    return (
        matched,
        [i for i in range(len(components)) if i not in used_c],
        [j for j in range(len(objects)) if j not in used_o],
    )


def evaluate(detector, scenes, batch: int = 64) -> dict:
    columns = [*CLASSES, "missed"]
    confusion = {row: dict.fromkeys(columns, 0) for row in (*SHAPES, "none")}
    agree = n = objects_total = confident = color_ok = matched_total = 0
    per_tag: dict[str, list[int]] = {}
    disagreements = []
    seconds = 0.0
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        t0 = time.perf_counter()
        analyzed = detector.analyze([image for _, image, _ in chunk])
        seconds += time.perf_counter() - t0
        for (line, _, objects), components in zip(chunk, analyzed, strict=True):
            truth = [Detection(o.label, 1.0, o.box, color=o.color) for o in objects]
            verdict_truth = evaluate_detections(truth, line)[0]
            verdict, reason, _ = evaluate_detections(detector.to_detections(components), line)
            same = verdict == verdict_truth
            agree += same
            n += 1
            per_tag.setdefault(line["tag"], [0, 0])[0] += same
            per_tag[line["tag"]][1] += 1
            if not same and len(disagreements) < 10:
                disagreements.append({"prompt": line["prompt"], "reason": reason})
            pairs, extra, missed = match(components, objects)
            for i, j in pairs:
                comp, obj = components[i], objects[j]
                confusion[obj.label][comp.label] += 1
                color_ok += comp.color == obj.color
                confident += comp.label == obj.label and comp.probs[CLASSES.index(obj.label)] > 0.9
            for i in extra:
                confusion["none"][components[i].label] += 1
            for j in missed:
                confusion[objects[j].label]["missed"] += 1
            objects_total += len(objects)
            matched_total += len(pairs)
    return {
        "images": n,
        "verdict_agreement": agree / n,
        "per_tag_agreement": {tag: a / m for tag, (a, m) in per_tag.items()},
        "objects": objects_total,
        "object_confident_share": confident / objects_total,
        "color_accuracy": color_ok / max(matched_total, 1),
        "confusion": confusion,
        "seconds_per_64_images": seconds / n * 64,
        "disagreements": disagreements,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def markdown(results: dict) -> str:
    lines = [
        "| images | n | verdict agreement | objects | right label, score > 0.9 | colour accuracy | s / 64 images |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['images']} | {100 * r['verdict_agreement']:.2f}% | {r['objects']} | "
            f"{100 * r['object_confident_share']:.2f}% | {100 * r['color_accuracy']:.2f}% | {r['seconds_per_64_images']:.3f} |"
        )
    tags = sorted({tag for r in results.values() for tag in r["per_tag_agreement"]})
    lines += ["", "| images | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_percent(r["per_tag_agreement"].get(t)) for t in tags) + " |")
    for name, r in results.items():
        columns = [*CLASSES, "missed"]
        lines += ["", f"Shape confusion, {name} (rows: truth, `none` = no true object; columns: detector)", ""]
        lines += ["| truth | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [
            f"| {row} | " + " | ".join(str(cells[c]) for c in columns) + " |" for row, cells in r["confusion"].items()
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="renders per prompt and split")
    parser.add_argument("--weights", default=None, help="detector safetensors (default: the committed one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    detector = ShapesDetector.load(args.weights)
    clean, degraded, touching = [], [], []
    for split_index, split in enumerate(("train", "heldout")):
        for index, line in enumerate(split_prompts(split)):
            for seed in range(args.seeds):
                rng = np.random.default_rng([split_index, index, seed])
                image, objects = render_scene(line, rng)
                clean.append((line, image, objects))
                degraded.append((line, degrade(image, rng), objects))
            if line["tag"] in ("two_object", "color_attr"):
                touching.append((line, *touching_scene(line, np.random.default_rng([split_index, index, 99]))))
    results = {name: evaluate(detector, scenes) for name, scenes in (("clean", clean), ("degraded", degraded))}
    results["touching"] = evaluate(detector, touching)
    print(markdown(results))
    for name, r in results.items():
        for case in r["disagreements"]:
            print(f"disagreement ({name}): {case['prompt']!r}: {case['reason']!r}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
