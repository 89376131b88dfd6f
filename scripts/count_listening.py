"""Does a model listen to count words? Its own denoising error, used as a count classifier.

    python scripts/count_listening.py --model models/shapes-sd15 --out runs/listening-base.json
    python scripts/count_listening.py --model models/shapes-sd15 --soft-tokens RUN/adapters/step-004000/adapter \
        --out runs/listening-agsm.json

Renders of the held-out counting prompts (true count k, drawn by the shapes renderer, so the images are perfect) are
noised at a few timesteps, and the denoiser predicts the noise under each counting caption "a photo of k' <shapes>"
for k' in the training counts 2-5, with the same noise for every caption. The caption with the lowest error is the
model's own guess of the count: the diffusion classifier of Li et al. (ICCV 2023), and the implicit reward AGSM's
target is tilted by. Reported per timestep and pooled: how often that guess is right (chance is 1 / 4) and the mean
error margin between the best wrong caption and the right one (positive: the right caption explains the image better),
and the *caption effect*: the variance of the prediction across the four captions as a share of its squared error.
AGSM's guidance direction is `pred_j - sum_k w_k pred_k`, so its push on count words is proportional to that spread.

A model that ignores count words sits at chance whatever it draws; a stage that teaches it to listen moves this
number without sampling a single image, and in seconds rather than the minutes a GenEval run takes. It separates
"cannot draw four" (listening fine, counting accuracy low) from "does not read four" (listening at chance).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def count_captions(shape: str) -> dict[int, str]:
    from softalign.shapes.vocabulary import NUMBER_WORDS, PLURALS, TRAIN_COUNTS

    return {k: f"a photo of {NUMBER_WORDS[k]} {PLURALS[shape]}" for k in TRAIN_COUNTS}


def score_candidates(errors: torch.Tensor, truth: int) -> tuple[list[bool], list[float]]:
    """For errors `(images, candidates)` and the right candidate's index: is the lowest error the right one, and the
    margin `min(wrong errors) - right error` per image (ties go to the first candidate, as `argmin` does)."""
    guess = errors.argmin(dim=1)
    wrong = torch.cat([errors[:, :truth], errors[:, truth + 1 :]], dim=1).min(dim=1).values
    return (guess == truth).tolist(), (wrong - errors[:, truth]).tolist()


def listening(backbone, split: str, images_per_prompt: int, timesteps: list[int], seed: int) -> dict:
    """Per timestep and pooled: accuracy of the error-argmin count and the mean margin (see the module docstring);
    `backbone` is `softalign.families.backbone_for(pipe)`."""
    from softalign.shapes.data import pil_to_tensor
    from softalign.shapes.prompts import split_prompts
    from softalign.shapes.render import render_scene

    lines = [line for line in split_prompts(split) if line["tag"] == "counting"]
    rng = np.random.default_rng(seed)
    right = {t: [] for t in timesteps}
    margins = {t: [] for t in timesteps}
    effects = {t: [] for t in timesteps}
    per_count: dict[int, list[bool]] = {}
    generator = torch.Generator().manual_seed(seed)
    for line in lines:
        shape, count = line["include"][0]["class"], line["include"][0]["count"]
        captions = count_captions(shape)
        counts = list(captions)
        pixels = torch.stack([pil_to_tensor(render_scene(line, rng)[0]) for _ in range(images_per_prompt)])
        x0, _ = backbone.encode_image_moments(pixels)
        conditioning = backbone.encode_prompts([captions[k] for k in counts])
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator)
            steps = torch.full((len(x0),), t, dtype=torch.long)
            noisy = backbone.add_noise(x0, noise, steps)
            target = backbone.training_target(x0, noise, steps)
            predictions = []
            with torch.no_grad():
                for j in range(len(counts)):
                    rows = {
                        key: value[j : j + 1].expand(len(x0), *value.shape[1:]) for key, value in conditioning.items()
                    }
                    predictions.append(backbone.predict(noisy, steps, rows).float())
            predictions = torch.stack(predictions)  # (candidates, images, C, H, W)
            errors = ((predictions - target) ** 2).mean(dim=(2, 3, 4)).T  # (images, candidates)
            hits, gaps = score_candidates(errors, counts.index(count))
            right[t] += hits
            margins[t] += gaps
            # AGSM's guidance direction is pred_j - sum_k w_k pred_k: how far the count word moves the prediction,
            # as a share of the prediction's own error. Near 0, there is no direction for AGSM to amplify.
            spread = ((predictions - predictions.mean(dim=0)) ** 2).mean(dim=(0, 2, 3, 4))
            effects[t].append((spread.mean() / errors.mean()).item())
            per_count.setdefault(count, []).extend(hits)
    pooled = [v for t in timesteps for v in right[t]]
    return {
        "split": split,
        "images": len(lines) * images_per_prompt,
        "candidates": "counts 2-5 (chance 0.25)",
        "accuracy": float(np.mean(pooled)),
        "n": len(pooled),
        "margin": float(np.mean([m for t in timesteps for m in margins[t]])),
        "caption_effect": float(np.mean([e for t in timesteps for e in effects[t]])),
        "per_timestep": {
            str(t): {
                "accuracy": float(np.mean(right[t])),
                "margin": float(np.mean(margins[t])),
                "caption_effect": float(np.mean(effects[t])),
            }
            for t in timesteps
        },
        "per_count": {str(k): float(np.mean(v)) for k, v in sorted(per_count.items())},
    }


def print_and_write(result: dict, out: str | None) -> None:
    """Print a diagnostic's result as JSON and, with `out`, also write it there (the scripts' shared output)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-sd15")
    parser.add_argument("--soft-tokens", help="A soft-token adapter directory to attach first.")
    parser.add_argument("--lora", help="A LoRA directory a softalign trainer wrote.")
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"])
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--timesteps", default="100,300,500,700", help="Comma-separated training timesteps.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="Also write the result here (JSON).")
    args = parser.parse_args()
    from softalign import load_pipeline
    from softalign.families import backbone_for
    from softalign.loaders import load_adapters

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    load_adapters(pipe, args.soft_tokens, args.lora)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    result = listening(backbone_for(pipe), args.split, args.images_per_prompt, timesteps, args.seed)
    result.update(model=args.model, soft_tokens=args.soft_tokens, lora=args.lora, seed=args.seed)
    print_and_write(result, args.out)


if __name__ == "__main__":
    main()
