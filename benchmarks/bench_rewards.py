"""Throughput of the reward / metric models and GenEval's plug-ins: images per second, batched vs one at a time.

Every scorer is timed in this one run on the same images, batched (one call for `--batch` images) and one image
per call, interleaved over `--repeats` rounds (the median is reported). Without weight directories the models are
the tiny random ones of `softalign.testing.models` (the numbers then measure the plumbing, not a real model):

    python benchmarks/bench_rewards.py [--images 16] [--batch 16] [--size 64] [--repeats 3] [--device cuda]
        [--clip DIR] [--pickscore DIR] [--hps DIR] [--aesthetic-head FILE] [--imagereward DIR] [--mask2former DIR]
        [--detector-scale 1333,800] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from softalign.eval import Detection
from softalign.eval.clip_colors import CLIPColorClassifier
from softalign.eval.mask2former import Mask2FormerDetector
from softalign.rewards import AestheticHead, AestheticScore, CLIPCore, CLIPScore, HPSv2, ImageReward, PickScore
from softalign.testing.models import tiny_blip, tiny_clip, tiny_mask2former

PROMPTS = ["a photo of a cat", "a photo of two dogs", "a photo of a red car", "a photo of a clock above a bench"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, n: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images scored per round")
    parser.add_argument("--batch", type=int, default=16, help="images per call in the batched variant")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip", help="CLIP directory for CLIPScore, the aesthetic head and GenEval's colours")
    parser.add_argument("--pickscore", help="PickScore_v1 directory (CLIPModel)")
    parser.add_argument("--hps", help="HPSv2 converted to a CLIPModel directory")
    parser.add_argument("--aesthetic-head", help="LAION aesthetic head .pth (needs --clip ViT-L/14)")
    parser.add_argument("--imagereward", help="ImageReward directory (convert_image_reward_checkpoint)")
    parser.add_argument("--mask2former", help="Mask2Former COCO instance-segmentation directory")
    parser.add_argument(
        "--detector-scale", default="1333,800", help="the detector's resize target, long,short (GenEval's: 1333,800)"
    )
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device

    # 1. models: real directories where given, tiny random ones otherwise
    scratch = Path(tempfile.mkdtemp(prefix="bench_rewards_"))
    tiny = scratch / "clip"
    if not (args.clip and args.pickscore and args.hps):
        tiny_clip(tiny)
    if args.aesthetic_head:
        head = AestheticHead.from_file(args.aesthetic_head)
    else:
        dim = CLIPCore.from_pretrained(args.clip or tiny).model.config.projection_dim
        head = AestheticHead(dim=dim)
    scorers = {
        "CLIPScore": CLIPScore.from_pretrained(args.clip or tiny, device=device),
        "PickScore": PickScore.from_pretrained(args.pickscore or tiny, device=device),
        "HPSv2": HPSv2.from_pretrained(args.hps or tiny, device=device),
        "aesthetic": AestheticScore(CLIPCore.from_pretrained(args.clip or tiny, device=device), head),
    }
    if args.imagereward:
        scorers["ImageReward"] = ImageReward.from_pretrained(args.imagereward, device=device)
    else:
        blip, bert = tiny_blip()
        scorers["ImageReward"] = ImageReward(
            blip.to(device), bert, AestheticHead(dim=blip.config.text_config.hidden_size)
        )
    if not args.mask2former:
        tiny_mask2former(scratch / "mask2former")
    scale = tuple(int(v) for v in args.detector_scale.split(","))
    detector = Mask2FormerDetector.from_pretrained(
        args.mask2former or scratch / "mask2former", device=device, scale=scale
    )
    colors = CLIPColorClassifier.from_pretrained(args.clip or tiny, device=device)

    # 2. the same images for every scorer
    generator = torch.Generator().manual_seed(0)
    tensors = torch.rand(args.images, 3, args.size, args.size, generator=generator)
    pil = [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for t in tensors]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    boxes = [Detection("cat", 0.9, (0, 0, args.size // 2, args.size // 2)) for _ in range(args.images)]

    def batched(fn):
        return lambda: [fn(s) for s in range(0, args.images, args.batch)]

    def single(fn):
        return lambda: [fn(i) for i in range(args.images)]

    variants = {}
    for name, scorer in scorers.items():
        variants[f"{name} reward (tensor)"] = (
            batched(lambda s, sc=scorer: sc(tensors[s : s + args.batch].to(device), prompts[s : s + args.batch])),
            single(lambda i, sc=scorer: sc(tensors[i : i + 1].to(device), prompts[i : i + 1])),
        )
        variants[f"{name} metric (PIL)"] = (
            batched(lambda s, sc=scorer: sc.metric(pil[s : s + args.batch], prompts[s : s + args.batch])),
            single(lambda i, sc=scorer: sc.metric(pil[i : i + 1], prompts[i : i + 1])),
        )
    variants["Mask2Former detector"] = (
        batched(lambda s: detector.detect(pil[s : s + args.batch])),
        single(lambda i: detector.detect(pil[i : i + 1])),
    )
    variants["CLIP colours (one image, N crops)"] = (
        batched(lambda s: colors.classify(pil[0], boxes[s : s + args.batch])),
        single(lambda i: colors.classify(pil[0], boxes[i : i + 1])),
    )

    # 3. interleaved rounds, after one warm-up call of each
    results = {}
    with torch.no_grad():
        for name, (many, one) in variants.items():
            many(), one()
            rates = {"batched": [], "one_at_a_time": []}
            for _ in range(args.repeats):
                rates["batched"].append(rate(many, args.images, device))
                rates["one_at_a_time"].append(rate(one, args.images, device))
            results[name] = {key: statistics.median(values) for key, values in rates.items()}

    print(f"images/s on {device} ({platform.processor() or platform.machine()}, {args.threads} threads), "
          f"{args.images} images of {args.size}px, batch {args.batch}, median of {args.repeats}; "
          f"models: {'tiny random' if not args.clip else 'local weights'}")  # fmt: skip
    print("| scorer | batched | one at a time | speed-up |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['batched']:.1f} | {r['one_at_a_time']:.1f} | {r['batched'] / r['one_at_a_time']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "images_per_second": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
