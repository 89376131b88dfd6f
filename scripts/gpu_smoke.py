"""Every trainer for a few steps on a CUDA device, for each tiny family: a check of device placement, not of numbers.

The test suite runs on CPU (CI has no GPU), where a tensor left on the wrong device goes unnoticed. This script
runs the same stages on `cuda` (fp32 and bf16 autocast) and prints one line per case, so a device lent for a few
minutes can check them all in one call:

    python scripts/gpu_smoke.py [--families sd15 sdxl sd3 sd35 flux] [--json out.json]   # default: every tiny family
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState

from softalign import SoftTokens, SoftTokensConfig
from softalign.families import context_dim_of
from softalign.rl import DDPOConfig, DDPOTrainer, DiffusionDPOConfig, DiffusionDPOTrainer
from softalign.shapes.prompts import split_prompts
from softalign.shapes.render import render_scene
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline
from softalign.testing.pipelines import FAMILIES as TINY_FAMILIES

RESOLUTION = 32


def shapes_pairs(n: int = 16):
    rng = np.random.default_rng(0)
    lines = split_prompts("train")[:n]
    return [(render_scene(line, rng, size=RESOLUTION)[0], line["prompt"]) for line in lines]


def lora():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])


def softalign_stage(pipe, out, objective="agsm", precision="no", tokens=None, peft_config=None):
    config = SoftAlignConfig(
        output_dir=str(out),
        objective=objective,
        max_steps=2,
        train_batch_size=8,
        resolution=RESOLUTION,
        save_steps=0,
        mixed_precision=precision,
    )
    trainer = SoftAlignTrainer(pipe, config, shapes_pairs(), soft_tokens=tokens, peft_config=peft_config)
    trainer.train()
    return trainer


def ddpo_stage(pipe, out, tokens=None, peft_config=None, precision="no", alongside=None, kl_coef=0.0):
    alongside, weight = alongside if alongside else (None, 0.0)
    config = DDPOConfig(
        output_dir=str(out),
        num_epochs=1,
        sample_num_steps=3,
        sample_batch_size=2,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        resolution=RESOLUTION,
        mixed_precision=precision,
        kl_coef=kl_coef,
        alongside_weight=weight,
    )
    trainer = DDPOTrainer(
        config,
        lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}),
        lambda: ("two red circles", {}),
        pipe,
        soft_tokens=tokens,
        peft_config=peft_config,
        alongside=alongside,
    )
    trainer.train()
    return trainer


def dpo_stage(pipe, out, tokens, alongside=None, precision="no"):
    from PIL import Image

    preferences = [
        {"caption": caption, "chosen": image, "rejected": Image.new("RGB", image.size, "white")}
        for image, caption in shapes_pairs(4)
    ]
    config = DiffusionDPOConfig(
        output_dir=str(out), max_steps=2, resolution=RESOLUTION, mixed_precision=precision, alongside_weight=0.5
    )
    trainer = DiffusionDPOTrainer(pipe, config, preferences, soft_tokens=tokens, alongside=alongside)
    trainer.train()
    return trainer


def cases(family: str, device: str):
    """(name, callable(out_dir)) pairs; each builds its own pipeline on the GPU."""

    def pipe():
        return tiny_pipeline(family).to(device)

    def tokens_for(p):
        return SoftTokens(SoftTokensConfig.for_family(family, dim=context_dim_of(p), init="normal"))

    def chain(out, precision="no"):
        p = pipe()
        stage1 = softalign_stage(p, out / "1", precision=precision)
        ddpo_stage(p, out / "2", tokens=stage1.soft_tokens, precision=precision, kl_coef=0.1)
        dpo_stage(p, out / "3", stage1.soft_tokens, alongside=stage1, precision=precision)
        generator = torch.Generator(device).manual_seed(0)
        image = p("two red circles", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, generator=generator)
        assert image.images[0].size == (RESOLUTION, RESOLUTION)

    yield "agsm -> ddpo (kl) -> dpo (alongside) -> generate", lambda out: chain(out)
    yield "same chain, bf16 autocast", lambda out: chain(out, "bf16")
    yield "softrepa", lambda out: softalign_stage(pipe(), out, objective="softrepa")
    yield "agsm, tokens + two LoRA banks", lambda out: softalign_stage(pipe(), out, peft_config=lora())
    yield "ddpo, LoRA only", lambda out: ddpo_stage(pipe(), out, peft_config=lora())

    def ddpo_alongside(out):
        p = pipe()
        tokens = tokens_for(p)
        stage1 = softalign_stage(p, out / "1", tokens=tokens)
        ddpo_stage(p, out / "2", tokens=tokens, alongside=(stage1, 0.5))

    yield "ddpo with the alignment term alongside", ddpo_alongside


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILIES))  # SD1.5, SDXL, SD3, SD3.5, FLUX.1
    parser.add_argument("--device", default="cuda", help="cpu runs the same cases as a dry run of this script.")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py needs a CUDA device (or --device cpu for a dry run).")
    results = []
    for family in args.families:
        for name, run in cases(family, args.device):
            # accelerate keeps one process-wide state whose mixed precision cannot change; each case starts afresh
            AcceleratorState._reset_state(reset_partial_state=True)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                try:
                    run(Path(out))
                    status, detail = "ok", ""
                except Exception as error:  # report every case, not just the first failure
                    status, detail = "FAIL", "".join(traceback.format_exception(error)[-6:])
            results.append({"family": family, "case": name, "status": status, "seconds": time.perf_counter() - started})
            print(f"{status:4} {family:5} {name} ({results[-1]['seconds']:.1f} s)", flush=True)
            if detail:
                print(detail, flush=True)
                results[-1]["error"] = detail
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device_name(args.device), "torch": torch.__version__, "results": results}, indent=2)
        )
    sys.exit(any(r["status"] != "ok" for r in results))


if __name__ == "__main__":
    main()
