"""Inference overhead of attached soft tokens: the same pipeline, prompts and seeds with and without tokens.

Runs alone on the machine; both variants are timed in this one run, interleaved, and compared as a ratio.

    python benchmarks/bench_inference.py [--family sd15] [--size 64] [--steps 20] [--repeats 7] [--json out.json]

`--real-size` builds the SD1.5 UNet at its real configuration (860M parameters, random weights, nothing downloaded)
and times single denoiser calls on 64x64 latents (a 512px image) with a CFG batch of `--batch` rows and a 77-token
context, with and without tokens, interleaved:

    python benchmarks/bench_inference.py --real-size [--batch 2] [--repeats 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
from softalign.families import context_dim_of
from softalign.testing import tiny_pipeline

PROMPTS = ["a photo of a cat", "two red circles", "a blue square above a green triangle", "three stars"]


def generate(pipe, size: int, steps: int) -> None:  # output_type np copies to the host: a CUDA sync
    pipe(
        PROMPTS,
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator(pipe.device).manual_seed(0),
    )


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def real_size_calls(args) -> dict:
    """Median wall time of one real-size SD1.5 UNet call, base and with tokens, interleaved (`--real-size`)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import Timer, sd15_pipeline

    unet = sd15_pipeline("sd15", resolution=128).unet.to(args.device)  # sample_size 64: SD1.5's latent side
    config = SoftTokensConfig.for_family("sd15", dim=unet.config.cross_attention_dim, init="normal")
    injection = attach_soft_tokens(unet, SoftTokens(config))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, 64, 64, generator=generator).to(args.device)
    context = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=generator).to(args.device)
    timestep = torch.tensor([500], device=args.device)
    times = {"base": [], "soft tokens": []}
    cpu = {"base": 0.0, "soft tokens": 0.0}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):  # round 0 warms both paths up
            for name in times:
                (injection.attach if name == "soft tokens" else injection.detach)()
                with Timer(args.device) as timer:
                    unet(latents, timestep, encoder_hidden_states=context)
                if round_:
                    times[name].append(timer.wall)
                    cpu[name] += timer.cpu
    injection.detach()
    return {"times": times, "cpu": cpu, "parameters": sum(p.numel() for p in unet.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "sd3"])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--real-size", action="store_true", help="the real SD1.5 UNet, 64x64 latents, single calls")
    parser.add_argument("--batch", type=int, default=2, help="--real-size: rows per call (2: one prompt with CFG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.real_size:
        return report_real_size(args)

    latent = args.size // 2  # the tiny VAE downsamples by 2
    overrides = (
        {"sample_size": latent} if args.family != "sd3" else {"sample_size": latent, "pos_embed_max_size": latent}
    )
    pipe = tiny_pipeline(args.family, **overrides).to(args.device)
    config = SoftTokensConfig.for_family(args.family, dim=context_dim_of(pipe), init="normal")
    injection = attach_soft_tokens(pipe, SoftTokens(config))
    injection.detach()

    generate(pipe, args.size, args.steps)  # warm-up of both paths
    injection.attach()
    generate(pipe, args.size, args.steps)
    injection.detach()

    times = {"base": [], "soft tokens": []}
    cpu = {"base": 0.0, "soft tokens": 0.0}
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        for name in ("base", "soft tokens"):
            if name == "soft tokens":
                injection.attach()
            wall, cpu_seconds = timed(lambda: generate(pipe, args.size, args.steps))
            injection.detach()
            times[name].append(wall)
            cpu[name] += cpu_seconds

    base, tuned = statistics.median(times["base"]), statistics.median(times["soft tokens"])
    ratio = tuned / base
    print(
        f"\nsoft-token inference overhead: {args.family}, {args.size}x{args.size}, {args.steps} steps, "
        f"{len(PROMPTS)} prompts, CFG on, {args.threads} threads, {args.device}, {args.repeats} repeats, torch {torch.__version__}"
    )
    print_overhead_table(times, cpu, ratio)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "family": args.family,
                    "size": args.size,
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "device": args.device,
                    "machine": platform.platform(),
                    "torch": torch.__version__,
                    "wall_seconds": times,
                    "cpu_seconds": cpu,
                    "ratio": ratio,
                },
                handle,
                indent=2,
            )


def print_overhead_table(times: dict, cpu: dict, ratio: float) -> None:
    """The with / without tokens table and the overhead ratio, as both modes print them."""
    print("| variant | median wall s | min wall s | CPU s (all repeats) |")
    print("|---|---|---|---|")
    for name in times:
        print(f"| {name} | {statistics.median(times[name]):.4f} | {min(times[name]):.4f} | {cpu[name]:.2f} |")
    print(f"\noverhead ratio (median soft tokens / median base): {ratio:.4f}  ({(ratio - 1) * 100:+.2f}%)")


def report_real_size(args) -> None:
    """Print and save the `--real-size` table."""
    result = real_size_calls(args)
    times, cpu = result["times"], result["cpu"]
    ratio = statistics.median(times["soft tokens"]) / statistics.median(times["base"])
    print(
        f"\nsoft-token overhead per denoiser call: SD1.5 UNet at its real configuration "
        f"({result['parameters'] / 1e6:.0f}M parameters, random weights), 64x64 latents, batch {args.batch}, "
        f"77-token context, {args.threads} threads, {args.device}, {args.repeats} interleaved repeats, "
        f"torch {torch.__version__}"
    )
    print_overhead_table(times, cpu, ratio)
    if args.json:
        payload = {
            "mode": "real-size",
            "family": "sd15",
            "latent": 64,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": args.device,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "parameters": result["parameters"],
            "wall_seconds": times,
            "cpu_seconds": cpu,
            "ratio": ratio,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
