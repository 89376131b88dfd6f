"""Speed and memory of the AGSM training step against a naive reference in the structure of the official code.

The reference (as `jaayeon/AGSM` `train.py` without precomputed encodings) runs the VAE and the text encoder on every
step, and calls the denoiser once per image for the online predictions and once more per image for the EMA ones;
softalign's step reads cached latents and conditioning and evaluates the pair grid in chunks. Same tiny backbone,
same batch, same seed. Before timing, both losses are checked to agree (to 1e-5) on the same inputs.

Each (variant, batch size) runs in its own subprocess so its peak memory can be read (CPU: peak RSS above the
process's RSS before the first step; CUDA: `max_memory_allocated`).

    python benchmarks/bench_softalign_step.py [--batches 4 8 16 32] [--steps 5] [--size 64] [--json out.json]

`--real-size` puts the SD1.5 UNet at its real configuration (860M parameters, random weights, nothing downloaded) in
the pipeline, at small latents (`--size 16` pixels: 8x8 latents by default), B = 4 and 16, with gradient
checkpointing off and on, one timed step each: seconds per pair and peak memory, which must stay flat in B.

    python benchmarks/bench_softalign_step.py --real-size [--batches 4 16] [--size 16] [--steps 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RSSSampler, run_worker, sd15_pipeline, write_json  # noqa: E402

from softalign import objectives  # noqa: E402
from softalign.softalign_config import SoftAlignConfig  # noqa: E402
from softalign.softalign_trainer import SoftAlignTrainer  # noqa: E402

GROUP = 4  # one positive, three negatives


def make_trainer(batch: int, size: int, device: str, unet: str = "tiny", checkpointing: bool = False):
    import numpy as np

    from softalign.shapes.prompts import split_prompts
    from softalign.shapes.render import render_scene

    rng = np.random.default_rng(0)
    lines = split_prompts("train")
    pairs = [
        (render_scene(lines[i % len(lines)], rng, size=size)[0], lines[i % len(lines)]["prompt"])
        for i in range(max(64, batch))
    ]
    pipe = sd15_pipeline(unet, size).to(device)  # "tiny": the test pipeline; "sd15": the real UNet configuration
    if checkpointing:  # recompute the UNet's activations in the backward instead of keeping them
        pipe.unet.enable_gradient_checkpointing()
    config = SoftAlignConfig(
        output_dir="/tmp/softalign-bench",
        train_batch_size=batch,
        chunk_size=GROUP,
        max_steps=1000,
        resolution=size,
        save_steps=0,
        seed=0,
        ema_decay=0.9,
    )
    trainer = SoftAlignTrainer(pipe, config, pairs)
    trainer.prepare_data()
    return trainer, pairs


def naive_step(trainer, pairs, indices, t, noise, eps):
    """One AGSM step written like the official loop: encode everything, per-image online and EMA calls."""
    from softalign.data import preprocess

    backbone, a = trainer.backbone, trainer.args
    device = backbone.device
    pixels = torch.stack([preprocess(pairs[i][0], a.resolution, True, "") for i in indices.tolist()])
    mean, std = backbone.encode_image_moments(pixels)  # the VAE, every step
    latents = (mean + std * eps).to(device)
    captions = [pairs[i][1] for i in indices.tolist()]
    conditioning = backbone.encode_prompts(captions)["prompt_embeds"]  # the text encoder, every step
    noisy = backbone.add_noise(latents, noise, t)
    target = backbone.training_target(latents, noise, t)
    injection, n = trainer.trained.injection, latents.shape[0]
    total = 0.0
    for i in range(n):
        group = (i // GROUP) * GROUP + torch.arange(GROUP, device=device)
        label = torch.tensor([i % GROUP], device=device)
        banks = (group != i).long()
        x = noisy[i : i + 1].expand(GROUP, -1, -1, -1)
        with injection.use_banks(banks):
            prediction = backbone.predict(x, t.expand(GROUP), {"prompt_embeds": conditioning[group]})
            with torch.no_grad(), injection.swapped(trainer.trained.ema_tokens):
                ema = backbone.predict(x, t.expand(GROUP), {"prompt_embeds": conditioning[group]})
        terms = objectives.agsm_rows(
            prediction[None], ema[None], target[i : i + 1, None], label, a.gamma_pos, a.gamma_neg, a.temperature
        )
        loss = objectives.agsm_loss_from_rows(terms, n, n * (GROUP - 1), a.gamma_neg)
        loss.backward()
        total += loss.item()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.trained.update_ema(a.ema_decay)
    return total


def step_inputs(trainer, step):
    """The batch, t, noise and latent noise softalign's own step draws (so both variants see the same inputs)."""
    generator = trainer._generator(step, 0)
    indices = trainer._batch_indices(step, 0)
    mean = trainer.data.latent_mean[indices]
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    t = torch.randint(trainer.args.min_timestep, trainer.args.max_timestep, (1,), generator=generator)
    noise = torch.randn((1, *mean.shape[1:]), generator=generator).expand_as(mean)
    device = trainer.backbone.device
    return indices, t.to(device), noise.to(device), eps


def check_same_loss(batch: int, size: int, device: str, unet: str = "tiny") -> float:
    trainer, pairs = make_trainer(batch, size, device, unet)
    ours = trainer.alignment_term().backward(0)["loss"]  # the public "alongside" contract: one step's term
    trainer.optimizer.zero_grad(set_to_none=True)
    naive = naive_step(trainer, pairs, *step_inputs(trainer, 0))
    return abs(ours - naive)


def worker(variant: str, batch: int, size: int, steps: int, device: str, unet: str, checkpointing: bool) -> dict:
    trainer, pairs = make_trainer(batch, size, device, unet, checkpointing)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = RSSSampler.rss_bytes()
    run = (
        (lambda s: trainer._optimizer_step(s))
        if variant == "softalign"
        else (lambda s: naive_step(trainer, pairs, *step_inputs(trainer, s)))
    )
    with RSSSampler() as sampler:
        run(0)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(1, steps + 1):
            run(step)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (sampler.peak - rss_before) / 2**20  # growth of resident memory during the steps
    return {
        "variant": variant,
        "batch": batch,
        "checkpointing": checkpointing,
        "steps_per_s": steps / wall,
        "pairs_per_s": steps * batch * GROUP / wall,
        "cpu_s": cpu,
        "peak_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", help="default 4 8 16 32 (--real-size: 4 16)")
    parser.add_argument("--steps", type=int, help="timed steps per run, after a warm-up (default 5; --real-size 1)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 64; --real-size 16)")
    parser.add_argument("--real-size", action="store_true", help="the SD1.5 UNet at its real configuration")
    parser.add_argument(
        "--checkpointing", choices=["off", "on", "both"], help="gradient checkpointing (default off; --real-size both)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    real = args.real_size
    args.batches = args.batches or ([4, 16] if real else [4, 8, 16, 32])
    args.steps = args.steps or (1 if real else 5)
    args.size = args.size or (16 if real else 64)
    args.checkpointing = args.checkpointing or ("both" if real else "off")
    unet = "sd15" if real else "tiny"
    torch.set_num_threads(args.threads)
    if args.worker:
        variant, batch, checkpointing = args.worker[0], int(args.worker[1]), args.worker[2] == "on"
        print(json.dumps(worker(variant, batch, args.size, args.steps, args.device, unet, checkpointing)))
        return
    check_batch = min(args.batches) if real else 8  # the real UNet's check at the smallest batch keeps it short
    difference = check_same_loss(check_batch, args.size, args.device, unet)
    print(f"loss check (B={check_batch}): |softalign - naive| = {difference:.2e}")
    if difference > 1e-5:
        raise SystemExit("The two implementations disagree; not timing them.")
    common = [f"--size={args.size}", f"--steps={args.steps}", f"--threads={args.threads}", f"--device={args.device}"]
    common += ["--real-size"] if real else []
    rows = []
    for checkpointing in ("off", "on") if args.checkpointing == "both" else (args.checkpointing,):
        for batch in args.batches:
            result = {}
            for variant in ("naive", "softalign"):
                result[variant] = run_worker(__file__, [variant, str(batch), checkpointing], common, args.threads)
            rows.append(result)
    model = "SD1.5 UNet at its real configuration (random weights)" if real else "tiny SD1.5"
    print(
        f"\nAGSM step, {model} at {args.size}x{args.size} px, groups of {GROUP} (1 positive : 3 negatives), "
        f"{args.steps} timed steps, {args.threads} threads, {args.device}, torch {torch.__version__}"
    )
    print(
        "| B | grad. ckpt | naive s/pair | softalign s/pair | speedup | naive peak MB | softalign peak MB "
        "| naive CPU s | softalign CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, s = r["naive"], r["softalign"]
        print(
            f"| {n['batch']} | {'on' if n['checkpointing'] else 'off'} | {1 / n['pairs_per_s']:.4f} "
            f"| {1 / s['pairs_per_s']:.4f} | {s['pairs_per_s'] / n['pairs_per_s']:.2f}x "
            f"| {n['peak_mb']:.0f} | {s['peak_mb']:.0f} | {n['cpu_s']:.1f} | {s['cpu_s']:.1f} |"
        )
    if args.json:
        write_json(
            args.json,
            {
                "loss_difference": difference,
                "rows": rows,
                "device": args.device,
                "threads": args.threads,
                "size": args.size,
                "unet": unet,
                "steps": args.steps,
            },
        )


if __name__ == "__main__":
    main()
