"""Check the shapes detector against hand labels on images a model generated.

    python scripts/detector_agreement.py generate --model models/shapes-sd15 --out data/hand_labels --n 200
    # look at data/hand_labels/sheet-*.png and write data/hand_labels/labels.jsonl:
    #   {"file": "images/0000.png", "correct": true}   (GenEval's verdict for the image's prompt, judged by eye)
    python scripts/detector_agreement.py score --labels data/hand_labels

`generate` draws one image per prompt-seed pair, cycling through the held-out prompts tag by tag, and writes numbered
contact sheets (image, number, prompt) to label from. `score` runs the committed detector through GenEval's rules on
every labelled image and reports the agreement with the hand verdicts, per tag and as a confusion table.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def generate(args) -> None:
    from softalign import load_pipeline
    from softalign.shapes.prompts import split_prompts
    from softalign.shapes.vocabulary import TAGS

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    lines = split_prompts("heldout")
    by_tag = {tag: [line for line in lines if line["tag"] == tag] for tag in TAGS}
    plan = []
    while len(plan) < args.n:
        for tag in TAGS:
            members = by_tag[tag]
            plan.append(members[(len(plan) // len(TAGS)) % len(members)])
    plan = plan[: args.n]
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(plan), 32):
        batch = plan[start : start + 32]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
        images = pipe(
            [line["prompt"] for line in batch],
            num_inference_steps=20,
            guidance_scale=args.guidance_scale,
            generator=generators,
        ).images
        for i, (line, image) in enumerate(zip(batch, images, strict=True)):
            name = f"images/{start + i:04d}.png"
            image.save(out / name)
            rows.append({"file": name, "prompt": line["prompt"], "metadata": line})
    (out / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "generation.json").write_text(
        json.dumps(
            {"model": args.model, "seed": args.seed, "n": args.n, "guidance_scale": args.guidance_scale}, indent=2
        )
        + "\n"
    )
    for sheet, start in enumerate(range(0, len(rows), 40)):
        contact_sheet(out, rows[start : start + 40], start, out / f"sheet-{sheet}.png")


def contact_sheet(root: Path, rows, first: int, path: Path, scale: int = 3, columns: int = 8) -> None:
    cell_w, cell_h = 64 * scale, 64 * scale + 40
    sheet = Image.new("RGB", (columns * cell_w, ((len(rows) + columns - 1) // columns) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(rows):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        image = Image.open(root / row["file"]).resize((64 * scale, 64 * scale), Image.NEAREST)
        sheet.paste(image, (x, y))
        draw.rectangle([x, y, x + cell_w - 1, y + 64 * scale - 1], outline="gray")
        words = row["prompt"].removeprefix("a photo of ")
        draw.text((x + 2, y + 64 * scale + 2), f"{first + k}: {words[:30]}", fill="black")
        draw.text((x + 2, y + 64 * scale + 16), words[30:60], fill="black")
    sheet.save(path)


def score(args) -> dict:
    from softalign.eval.rules import evaluate_detections
    from softalign.shapes.detector import ShapesDetector

    torch.set_num_threads(1)
    root = Path(args.labels)
    index = {row["file"]: row for row in map(json.loads, (root / "index.jsonl").read_text().splitlines())}
    labels = [json.loads(line) for line in (root / "labels.jsonl").read_text().splitlines() if line.strip()]
    detector = ShapesDetector.load()
    confusion, per_tag = Counter(), Counter()
    disagreements = []
    for label in labels:
        row = index[label["file"]]
        predicted, reason, _ = evaluate_detections(
            detector(Image.open(root / label["file"]).convert("RGB")), row["metadata"]
        )
        confusion[(bool(label["correct"]), bool(predicted))] += 1
        per_tag[(row["metadata"]["tag"], bool(label["correct"]) == bool(predicted))] += 1
        if bool(label["correct"]) != bool(predicted):
            disagreements.append(
                {
                    "file": label["file"],
                    "prompt": row["prompt"],
                    "hand": label["correct"],
                    "detector": predicted,
                    "reason": reason,
                }
            )
    n = len(labels)
    agree = confusion[(True, True)] + confusion[(False, False)]
    print(f"agreement: {agree}/{n} = {100 * agree / n:.1f}%")
    print("| hand \\ detector | correct | incorrect |\n|---|---|---|")
    print(f"| correct | {confusion[(True, True)]} | {confusion[(True, False)]} |")
    print(f"| incorrect | {confusion[(False, True)]} | {confusion[(False, False)]} |")
    print("\n| tag | agreement |\n|---|---|")
    for tag in sorted({t for t, _ in per_tag}):
        total = per_tag[(tag, True)] + per_tag[(tag, False)]
        print(f"| {tag} | {per_tag[(tag, True)]}/{total} |")
    for item in disagreements:
        print(
            f"- {item['file']} ({item['prompt']}): hand {item['hand']}, detector {item['detector']}: {item['reason']}"
        )
    return {"agreement": agree / n, "n": n, "disagreements": disagreements}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate")
    make.add_argument("--model", required=True)
    make.add_argument("--out", default="data/hand_labels")
    make.add_argument("--n", type=int, default=200)
    make.add_argument("--seed", type=int, default=7)
    make.add_argument("--guidance-scale", type=float, default=7.5)
    make.add_argument("--threads", type=int, default=1)
    make.set_defaults(handler=generate)
    check = commands.add_parser("score")
    check.add_argument("--labels", default="data/hand_labels")
    check.set_defaults(handler=score)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
