"""Speed and memory of the AGSM training step against a naive reference in the structure of the official code.

The reference (as `jaayeon/AGSM` `train.py` without precomputed encodings) runs the VAE and the text encoder on every
step, and calls the denoiser once per image for the online predictions and once more per image for the EMA ones;
softalign's step reads cached latents and conditioning and evaluates the pair grid in chunks. Same tiny backbone,
same batch, same seed. Before timing, both losses are checked to agree (to 1e-5) on the same inputs.

Each (variant, batch size) runs in its own subprocess so its peak memory can be read (CPU: peak RSS above the
process's RSS before the first step; CUDA: `max_memory_allocated`).

    python benchmarks/bench_softalign_step.py [--batches 4 8 16 32] [--steps 5] [--size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import threading
import time

import torch

from softalign import objectives
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline

GROUP = 4  # one positive, three negatives


def make_trainer(batch: int, size: int, device: str):
    import numpy as np

    from softalign.shapes.prompts import split_prompts
    from softalign.shapes.render import render_scene

    rng = np.random.default_rng(0)
    lines = split_prompts("train")
    pairs = [
        (render_scene(lines[i % len(lines)], rng, size=size)[0], lines[i % len(lines)]["prompt"])
        for i in range(max(64, batch))
    ]
    pipe = tiny_pipeline("sd15", sample_size=size // 2).to(device)
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


def check_same_loss(batch: int, size: int, device: str) -> float:
    trainer, pairs = make_trainer(batch, size, device)
    ours = trainer.alignment_term().backward(0)["loss"]  # the public "alongside" contract: one step's term
    trainer.optimizer.zero_grad(set_to_none=True)
    naive = naive_step(trainer, pairs, *step_inputs(trainer, 0))
    return abs(ours - naive)


class RSSSampler:
    """Peak resident memory while the steps run, sampled every millisecond from /proc (CPU runs)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(variant: str, batch: int, size: int, steps: int, device: str) -> dict:
    trainer, pairs = make_trainer(batch, size, device)
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
        "steps_per_s": steps / wall,
        "pairs_per_s": steps * batch * GROUP / wall,
        "cpu_s": cpu,
        "peak_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.size, args.steps, args.device)))
        return
    difference = check_same_loss(8, args.size, args.device)
    print(f"loss check (B=8): |softalign - naive| = {difference:.2e}")
    if difference > 1e-5:
        raise SystemExit("The two implementations disagree; not timing them.")
    rows = []
    for batch in args.batches:
        result = {}
        for variant in ("naive", "softalign"):
            command = [
                sys.executable,
                __file__,
                "--worker",
                variant,
                str(batch),
                "--steps",
                str(args.steps),
                "--size",
                str(args.size),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result[variant] = json.loads(output.strip().splitlines()[-1])
        rows.append(result)
    print(
        f"\nAGSM step, tiny SD1.5 at {args.size}x{args.size}, groups of {GROUP} (1 positive : 3 negatives), "
        f"{args.steps} timed steps, {args.threads} threads, {args.device}, torch {torch.__version__}"
    )
    print(
        "| B | naive pairs/s | softalign pairs/s | speedup | naive peak MB | softalign peak MB | naive CPU s | softalign CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, s = r["naive"], r["softalign"]
        print(
            f"| {n['batch']} | {n['pairs_per_s']:.1f} | {s['pairs_per_s']:.1f} | {s['pairs_per_s'] / n['pairs_per_s']:.2f}x "
            f"| {n['peak_mb']:.0f} | {s['peak_mb']:.0f} | {n['cpu_s']:.1f} | {s['cpu_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "loss_difference": difference,
                    "rows": rows,
                    "machine": platform.platform(),
                    "device": args.device,
                    "threads": args.threads,
                    "size": args.size,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
