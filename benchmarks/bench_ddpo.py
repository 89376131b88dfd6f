"""DDPO side by side: softalign's `DDPOTrainer`, softalign's TRL adapter and trl 0.23.1's own `DDPOTrainer`.

The same work for all three: one SD1.5-class pipeline (random weights, saved once and loaded by every variant), the
same prompts, sampler steps, eta, guidance, sample and train batches, and trl's default LoRA (rank 4, alpha 4,
gaussian init, on `to_q, to_k, to_v, to_out.0`: what `DefaultDDPOStableDiffusionPipeline.get_trainable_layers`
adds). trl runs exactly as a user runs it: `DefaultDDPOStableDiffusionPipeline(local_dir)` and `trl.DDPOTrainer`.

1. Parity, in this process: on one trajectory trl sampled, all three re-score every step's log-probability, and
   from the same starting weights and one batch (stored log-probs perturbed so that PPO's clip acts) all three give
   the same PPO loss and LoRA gradient. The benchmark stops if any differs by more than 1e-5.
2. Timing, one process per (variant, repeat), repeats interleaved: after a warm-up epoch, `--epochs` epochs with
   sampling (images/s) and training (trained timesteps/s) timed apart by wrapping the trainers' own phase methods,
   the whole epoch, CPU seconds, and peak memory (RSS above the process's start on CPU, `max_memory_allocated` on
   CUDA, both from before the models are built). Ratios are against trl.

    python benchmarks/bench_ddpo.py [--size small] [--resolution 32] [--steps 10] [--sample-batch 4]
        [--batches 2] [--train-batch 4] [--epochs 2] [--repeats 3] [--threads 2] [--device cpu] [--json out.json]
    python benchmarks/bench_ddpo.py --profile softalign     # cProfile of one worker, top functions
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SD15_SIZES,
    PeakMemory,
    Timer,
    interleaved,
    median_of,
    ratio_table,
    run_worker,
    sd15_pipeline,
    timed_method,
    write_json,
)

VARIANTS = ("trl", "softalign-trl-adapter", "softalign")
PROMPTS = ["a photo of a cat", "two red circles", "a blue square above a green triangle", "three stars"]
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # trl's DefaultDDPOStableDiffusionPipeline


def prompt_fn():
    """trl's contract: `() -> (prompt, metadata)`."""
    return random.choice(PROMPTS), {}


def reward_fn(images, prompts, metadata):
    """Mean brightness: negligible next to the sampler, so the benchmark times the trainers."""
    return images.float().mean(dim=(1, 2, 3)), {}


def save_base_pipeline(folder: str, size: str, resolution: int) -> str:
    """Build the seeded random pipeline once and save it, so every variant (and trl's `from_pretrained`) loads the
    very same weights."""
    sd15_pipeline(size, resolution).save_pretrained(folder)
    return folder


def lora_config():
    """trl's default adapter, for the two softalign variants."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def shared_settings(a) -> dict:
    """The DDPO settings every variant runs with (softalign's `DDPOConfig` takes trl's field names): one dict, so the
    three variants cannot drift apart."""
    return dict(
        num_epochs=1 + a.epochs,
        seed=0,
        sample_num_steps=a.steps,
        sample_eta=1.0,
        sample_guidance_scale=5.0,
        sample_batch_size=a.sample_batch,
        sample_num_batches_per_epoch=a.batches,
        train_batch_size=a.train_batch,
        train_timestep_fraction=1.0,
        train_cfg=True,
        save_freq=10**6,  # no checkpoints inside the timed epochs
    )


def trl_config(a, output_dir: str):
    """trl's `DDPOConfig` for the settings `a` (shared by trl and the adapter)."""
    from trl import DDPOConfig

    return DDPOConfig(
        **shared_settings(a),
        mixed_precision="no",
        logdir=str(Path(output_dir, "logs")),
        project_kwargs=dict(project_dir=str(Path(output_dir, "run"))),
        accelerator_kwargs={"cpu": True} if a.device == "cpu" else {},
    )


def build(variant: str, path: str, a, output_dir: str):
    """One trainer of `variant` on the pipeline saved at `path`."""
    from diffusers import StableDiffusionPipeline

    if variant == "softalign":
        from softalign.rl import DDPOConfig, DDPOTrainer

        pipe = StableDiffusionPipeline.from_pretrained(path).to(a.device)
        pipe.set_progress_bar_config(disable=True)
        config = DDPOConfig(output_dir=output_dir, **shared_settings(a))
        return DDPOTrainer(config, reward_fn, prompt_fn, pipe, peft_config=lora_config())
    from trl import DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from softalign.rl.trl import SoftAlignDDPOTrainer, SoftTokenDDPOStableDiffusionPipeline, ensure_accelerate_state

    ensure_accelerate_state()  # trl 0.23.1 defect 1: its pipeline and trainer need an accelerate state first
    if variant == "trl":
        pipe = DefaultDDPOStableDiffusionPipeline(path, use_lora=True)
        trainer_class = DDPOTrainer
    else:
        sd = StableDiffusionPipeline.from_pretrained(path)
        pipe = SoftTokenDDPOStableDiffusionPipeline.from_pipeline(sd, use_lora=True, lora_config=lora_config())
        trainer_class = SoftAlignDDPOTrainer
    pipe.set_progress_bar_config(disable=True)
    return trainer_class(trl_config(a, output_dir), reward_fn, prompt_fn, pipe)


def lora_state(trainer, variant: str) -> dict[str, torch.nn.Parameter]:
    """The trained LoRA parameters keyed by a name that is the same in every variant (the adapter name dropped)."""
    unet = trainer.pipe.unet if variant == "softalign" else trainer.sd_pipeline.unet
    adapter = ".softalign." if variant == "softalign" else ".default."
    return {n.replace(adapter, "."): p for n, p in unet.named_parameters() if "lora_" in n and adapter in n}


# -- 1. parity ------------------------------------------------------------------------------------------------------
def _trl_log_probs(trainer, sample) -> torch.Tensor:
    """Every step of `sample` re-scored the way trl's `calculate_loss` scores one: the UNet with CFG, then trl's
    `scheduler_step` with the stored next latent. `(B, steps)`."""
    embeds = torch.cat([sample["negative_prompt_embeds"], sample["prompt_embeds"]])
    trainer.sd_pipeline.scheduler.set_timesteps(sample["timesteps"].shape[1])  # trl's step reads its step size
    rows = []
    for j in range(sample["timesteps"].shape[1]):
        latents, timesteps = sample["latents"][:, j], sample["timesteps"][:, j]
        noise = trainer.sd_pipeline.unet(torch.cat([latents] * 2), torch.cat([timesteps] * 2), embeds).sample
        uncond, text = noise.chunk(2)
        noise = uncond + trainer.config.sample_guidance_scale * (text - uncond)
        step = trainer.sd_pipeline.scheduler_step(
            noise, timesteps, latents, eta=trainer.config.sample_eta, prev_sample=sample["next_latents"][:, j]
        )
        rows.append(step.log_probs)
    return torch.stack(rows, dim=1)


def _softalign_batch(trainer, sample, old_log_probs, advantages) -> dict:
    """trl's sample in the layout of softalign's `_ppo_loss`: latents `(B, steps + 1, ...)`, identity perms."""
    latents = torch.cat([sample["latents"], sample["next_latents"][:, -1:]], dim=1)
    steps = sample["timesteps"].shape[1]
    trainer.scheduler.set_timesteps(steps, device=latents.device)
    return {
        "latents": latents,
        "timesteps": sample["timesteps"],
        "log_probs": old_log_probs,
        "advantages": advantages,
        "perms": torch.arange(steps).expand(latents.shape[0], steps),
        "conditioning": {
            "cond": {"prompt_embeds": sample["prompt_embeds"]},
            "uncond": {"prompt_embeds": sample["negative_prompt_embeds"]},
        },
    }


def _softalign_log_probs(trainer, batch) -> torch.Tensor:
    rows = []
    for j in range(batch["timesteps"].shape[1]):
        latents, timesteps = batch["latents"][:, j], batch["timesteps"][:, j]
        output = trainer._predict(latents, timesteps, batch["conditioning"], guidance=True)
        _, log_prob = trainer._step(output, j, timesteps, latents, prev=batch["latents"][:, j + 1])
        rows.append(log_prob)
    return torch.stack(rows, dim=1)


def _grad(params: dict) -> dict:
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads


def check_parity(path: str, a, output_dir: str) -> dict:
    """Build the three trainers on the pipeline at `path`, give them trl's LoRA weights, and compare per-step
    log-probabilities of one trl trajectory and the PPO loss and LoRA gradient of one batch.

    Returns:
        `dict`: the largest absolute differences to trl (`log_prob_*`, `loss_*`, `grad_*`) and the values compared.
    """
    trainers = {v: build(v, path, a, str(Path(output_dir, v))) for v in VARIANTS}
    reference = lora_state(trainers["trl"], "trl")
    with torch.no_grad():
        # PEFT's gaussian init leaves lora_B at zero (the LoRA adds nothing yet); random A and B make every
        # comparison below depend on the adapter
        generator = torch.Generator().manual_seed(0)
        for param in reference.values():
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        for variant in VARIANTS[1:]:
            params = lora_state(trainers[variant], variant)
            if params.keys() != reference.keys():
                raise AssertionError(f"{variant}'s LoRA differs from trl's: {sorted(params.keys() ^ reference.keys())}")
            for name, param in params.items():
                param.copy_(reference[name])

    # one trajectory, sampled by trl (log-probs recorded while sampling)
    random.seed(0)
    torch.manual_seed(0)
    samples, _ = trainers["trl"]._generate_samples(iterations=1, batch_size=a.sample_batch)
    sample = samples[0]
    generator = torch.Generator().manual_seed(1)
    # stored log-probs off by about the clip range, so that PPO's clip decides some terms
    device = sample["log_probs"].device
    old = sample["log_probs"] + 3e-4 * torch.randn(sample["log_probs"].shape, generator=generator).to(device)
    advantages = torch.randn(a.sample_batch, generator=generator).to(device)
    batch = _softalign_batch(trainers["softalign"], sample, old, advantages)

    result = {}
    with torch.no_grad():
        scores = {v: _trl_log_probs(trainers[v], sample) for v in VARIANTS[:2]}
        scores["softalign"] = _softalign_log_probs(trainers["softalign"], batch)
    result["log_prob_sampling_vs_trl_rescored"] = (sample["log_probs"] - scores["trl"]).abs().max().item()
    for variant in VARIANTS[1:]:
        result[f"log_prob_{variant}"] = (scores[variant] - scores["trl"]).abs().max().item()

    j = a.steps // 2  # a middle step: noise and signal both matter
    embeds = torch.cat([sample["negative_prompt_embeds"], sample["prompt_embeds"]])
    losses, grads = {}, {}
    for variant in VARIANTS:
        trainer = trainers[variant]
        if variant == "softalign":
            loss, _ = trainer._ppo_loss(batch, j)
        else:
            loss, _, _ = trainer.calculate_loss(
                sample["latents"][:, j],
                sample["timesteps"][:, j],
                sample["next_latents"][:, j],
                old[:, j],
                advantages,
                embeds,
            )
        loss.backward()
        losses[variant], grads[variant] = loss.item(), _grad(lora_state(trainer, variant))
    scale = max(g.abs().max().item() for g in grads["trl"].values())
    for variant in VARIANTS[1:]:
        result[f"loss_{variant}"] = abs(losses[variant] - losses["trl"])
        worst = max((grads[variant][n] - grads["trl"][n]).abs().max().item() for n in grads["trl"])
        result[f"grad_{variant}"] = worst / scale  # relative to the largest gradient entry
    result["trl_loss"], result["trl_grad_max"] = losses["trl"], scale
    return result


def parity_differences(parity: dict) -> dict:
    """The entries of `check_parity`'s result that are differences (the rest are the values compared)."""
    return {k: v for k, v in parity.items() if not k.startswith("trl_")}


# -- 2. timing ------------------------------------------------------------------------------------------------------
def worker(variant: str, path: str, a) -> dict:
    """Build `variant`, run one warm-up epoch, then time `a.epochs` epochs; returns rates and peak memory."""
    torch.set_num_threads(a.threads)
    import diffusers  # noqa: F401  every variant's libraries load before memory is counted (trl's are large)
    import trl  # noqa: F401

    import softalign.rl.trl  # noqa: F401

    sampling, training = Timer(a.device), Timer(a.device)
    with tempfile.TemporaryDirectory(prefix="bench_ddpo_") as output_dir, PeakMemory(a.device) as memory:
        trainer = build(variant, path, a, output_dir)
        if variant == "softalign":
            timed_method(trainer, "_sample_batch", sampling)
            timed_method(trainer, "_train_epoch", training)
            trainer.save_checkpoint = lambda: None  # trl writes none either (save_freq beyond the run)

            def run(first, last):
                trainer.train(epochs=last)
        else:
            timed_method(trainer, "_generate_samples", sampling)
            timed_method(trainer, "_train_batched_samples", training)

            def run(first, last):
                for epoch in range(first, last):
                    trainer.step(epoch, epoch)

        run(0, 1)  # warm-up
        sampling.wall = sampling.cpu = training.wall = training.cpu = 0.0
        with Timer(a.device) as epoch:
            run(1, 1 + a.epochs)
    images = a.epochs * a.sample_batch * a.batches
    return {
        "variant": variant,
        "images_per_s": images / sampling.wall,
        "timesteps_per_s": images * a.steps / training.wall,  # every timestep of every trajectory is trained
        "epoch_s": epoch.wall / a.epochs,
        "epoch_cpu_s": epoch.cpu / a.epochs,
        "peak_mb": memory.mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SD15_SIZES), help="UNet size (SD1.5 class)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (latents are half)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per trajectory (all are trained)")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="sampling batches per epoch")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per worker, after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--profile", choices=VARIANTS, help="cProfile one worker of this variant and stop")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "PIPELINE_DIR"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    common = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("size", "resolution", "steps", "sample_batch")]
    common += [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("batches", "train_batch", "epochs", "threads")]
    common += [f"--device={a.device}"]
    if a.worker:
        import json

        print(json.dumps(worker(a.worker[0], a.worker[1], a)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_ddpo_") as scratch:
        path = save_base_pipeline(str(Path(scratch, "pipeline")), a.size, a.resolution)
        if a.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(worker, a.profile, path, a)
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(20)
            return
        parity = check_parity(path, a, str(Path(scratch, "parity")))
        print("parity against trl 0.23.1 (max abs difference; grad relative to its largest entry):")
        for key, value in parity.items():
            print(f"  {key}: {value:.2e}")
        if max(parity_differences(parity).values()) > 1e-5:
            raise SystemExit("The implementations disagree; not timing them.")
        runs = interleaved(list(VARIANTS), a.repeats, lambda v: run_worker(__file__, [v, path], common, a.threads))

    keys = ("images_per_s", "timesteps_per_s", "epoch_s", "epoch_cpu_s", "peak_mb")
    medians = {v: {k: median_of(runs[v], k) for k in keys} for v in VARIANTS}
    for values in medians.values():  # a rate, so that > 1 means faster than trl in every column
        values["epochs_per_s"] = 1 / values["epoch_s"]
    print(
        f"\nDDPO, SD1.5-class UNet '{a.size}' at {a.resolution}px, {a.steps} steps (all trained), eta 1, CFG 5, "
        f"{a.batches}x{a.sample_batch} samples per epoch, train batch {a.train_batch}, LoRA r4 on {','.join(LORA_TARGETS)}, "
        f"{a.epochs} timed epochs, median of {a.repeats} interleaved processes, {a.threads} threads, {a.device}, "
        f"torch {torch.__version__}"
    )
    columns = [
        ("images_per_s", "sampling images/s", ".2f"),
        ("timesteps_per_s", "training timesteps/s", ".2f"),
        ("epochs_per_s", "epochs/s", ".3f"),
        ("epoch_cpu_s", "CPU s/epoch", ".1f"),
        ("peak_mb", "peak MB", ".0f"),
    ]
    print(ratio_table(columns, medians, "trl"))
    write_json(a.json, {"benchmark": "ddpo", "settings": vars(a), "parity": parity, "runs": runs, "medians": medians})


if __name__ == "__main__":
    main()
