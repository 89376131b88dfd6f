"""Train a shipped shapes model from scratch on a CPU: a VAE, then the denoiser and the text encoder(s).

    python scripts/train_shapes_model.py --family sd15 --run-dir runs/shapes-sd15 --out models/shapes-sd15
    python scripts/train_shapes_model.py --family sd3 --run-dir runs/shapes-sd3 --out models/shapes-sd3 \
        --vae-from runs/shapes-sd15/vae-state.pt

- sd15: `StableDiffusionPipeline`: AutoencoderKL (64 px -> 4 x 16 x 16), a 3-layer 128-wide `CLIPTextModel` with the
  real CLIP vocabulary (its first 8192 merges), a `UNet2DConditionModel`, epsilon prediction on a cosine schedule.
- sd3: `StableDiffusion3Pipeline`: the same VAE (with SD3's shift and scale), two 64-wide
  `CLIPTextModelWithProjection`s and a null T5 (zero output: CLIP-only conditioning), an `SD3Transformer2DModel`
  trained with rectified flow, `x_t = (1 - s) x0 + s noise`, `s = t / 1000`, target `noise - x0` (as AGSM trains SD3).

Resumable: every `--save-every` steps the full training state (weights, EMA, optimiser, step) is written atomically
to `<run-dir>/<stage>-state.pt`, and re-running the same command continues from it. The EMA weights are exported as a
`StableDiffusionPipeline` to `--out` every `--export-every` steps, so a usable model exists at any time. Data are
shapes-world renders drawn from a seed per step (a resumed run sees the same batches): by default every
combination with web-like caption noise (`--captions web --noise-level 1`, `softalign.shapes.captions`); the v1
models used perfect captions of the training split (`--captions clean`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from softalign.atomic import atomic_directory, atomic_file
from softalign.sd3_padding import STOCK_T5_ROWS, collapse_zero_padding, null_t5_bypassed
from softalign.shapes.captions import CaptionNoise
from softalign.shapes.data import render_batch
from softalign.shapes.vocabulary import WORLD_VERSION
from softalign.testing.tokenizers import clip_tokenizer, t5_tokenizer

DATA_DESCRIPTION = {
    "web": "shapes world, every combination (held-out included), web-like noisy captions "
    "(softalign.shapes.captions, rates in caption_noise), a tag uniformly then a prompt, seed = step",
    "clean": "shapes world, training split (softalign.shapes.prompts.split_prompts('train')), seed = step",
}
TEXT_LENGTH = 24  # longest shapes-world caption is 14 CLIP tokens with BOS/EOS


def build_vae(args):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=args.size,
    )


def clip_config(tokenizer, hidden: int, layers: int):
    from transformers import CLIPTextConfig

    vocab = len(tokenizer)
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        projection_dim=hidden,
    )


def build_models(args) -> tuple[dict, dict]:
    """(trainable modules by pipeline component name, frozen parts: tokenizer(s) and VAE)."""
    tokenizer = clip_tokenizer(model_max_length=TEXT_LENGTH)
    frozen = {"tokenizer": tokenizer, "vae": build_vae(args)}
    if args.family == "sd15":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        trained = {
            "unet": UNet2DConditionModel(
                sample_size=args.size // 4,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(64, 128, 128),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=128,
                attention_head_dim=8,
                norm_num_groups=16,
            ),
            "text_encoder": CLIPTextModel(clip_config(tokenizer, 128, 3)),
        }
        return trained, frozen
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    frozen["tokenizer_2"] = clip_tokenizer(model_max_length=TEXT_LENGTH)
    trained = {
        "transformer": SD3Transformer2DModel(
            sample_size=args.size // 4,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=128,
            caption_projection_dim=128,
            pooled_projection_dim=128,
            pos_embed_max_size=args.size // 4,
        ),
        "text_encoder": CLIPTextModelWithProjection(clip_config(tokenizer, 64, 3)),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config(tokenizer, 64, 3)),
    }
    # Conditioned on CLIP alone (as SD3 allows): the third slot holds a null T5 whose every output row is 0, so the
    # stock loader needs no arguments; the pipeline appends 256 zero rows, which training feeds as one row with an exact
    # attention correction (softalign.sd3_padding), a 4x cheaper step.
    frozen["tokenizer_3"] = t5_tokenizer(words=[])
    frozen["text_encoder_3"] = null_t5(len(frozen["tokenizer_3"]), width=128)
    return trained, frozen


def null_t5(vocab_size: int, width: int):
    """A one-layer T5 encoder whose final layer norm has weight 0: every output row is exactly 0 (a null T5)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_ff=8,
        d_kv=8,
        num_layers=1,
        num_heads=1,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    model = T5EncoderModel(config).requires_grad_(False)
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model


def make_pipeline(args, trained: dict, frozen: dict):
    """The stock pipeline around the given modules (used to encode captions in training and to export)."""
    if args.family == "sd15":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            **trained,
            **frozen,
            scheduler=DDIMScheduler(
                num_train_timesteps=1000,
                beta_schedule="squaredcos_cap_v2",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        **trained,
        **frozen,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    )


def encode_captions(pipe, family: str, captions: list[str]) -> dict:
    """Conditioning through the pipeline's own `encode_prompt` (with gradient into the text encoders)."""
    if family == "sd15":
        embeds, _ = pipe.encode_prompt(captions, "cpu", 1, False)
        return {"encoder_hidden_states": embeds}
    with null_t5_bypassed(pipe):  # one zero row standing for the stock 256 (the transformer is collapsed)
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=1
        )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def save_state(path: Path, state: dict) -> None:
    with atomic_file(path) as temp:
        torch.save(state, temp)


def load_state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None  # our own file


def cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def log(run_dir: Path, record: dict) -> None:
    with open(run_dir / "log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def train_vae(args, vae, run_dir: Path):
    path = run_dir / "vae-state.pt"
    state = load_state(path)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    start = time.time()
    while step < args.vae_steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, warmup=100)
        images, _, _ = render_batch(args.vae_batch, seed=10_000_000 + step, split="web", size=args.size)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log(
                run_dir,
                {"stage": "vae", "step": step, "loss": loss.item(), "kl": kl.item(), "time": time.time() - start},
            )
            print(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f}", flush=True)
        if step % args.save_every == 0 or step == args.vae_steps:
            save_state(path, {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step})


@torch.no_grad()
def latent_statistics(vae, args) -> tuple[float, float]:
    """(shift, scale) that make the latents of training renders zero-mean (SD3 only) and unit-variance."""
    images, _, _ = render_batch(256, seed=999, size=args.size)
    latents = vae.encode(images).latent_dist.mean.flatten()
    shift = float(latents.mean()) if args.family == "sd3" else 0.0
    return shift, float(1.0 / (latents - shift).std())


def noisy_and_target(family: str, latents, noise, t, alphas):
    """sd15: DDPM noising, epsilon target; sd3: rectified flow with s = t / 1000, target noise - x0."""
    if family == "sd15":
        a = alphas[t][:, None, None, None]
        return a.sqrt() * latents + (1 - a).sqrt() * noise, noise
    s = (t.float() / 1000)[:, None, None, None]
    return (1 - s) * latents + s * noise, noise - latents


def predict(family: str, denoiser, noisy, t, conditioning):
    if family == "sd15":
        return denoiser(noisy, t, **conditioning).sample
    return denoiser(hidden_states=noisy, timestep=t.float(), **conditioning).sample


def export(args, ema: dict, frozen: dict, out: Path, card: dict) -> None:
    pipe = make_pipeline(args, ema, frozen)
    with atomic_directory(out) as staging:
        pipe.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"exported {out} at step {card['steps']}", flush=True)


def init_from_export(args, trained: dict, ema: dict, run_dir: Path) -> tuple[int, float]:
    """Start from an exported model (its EMA weights) when the run directory holds no state.

    The optimiser starts fresh. The step counter continues from the export's `training.json`, or starts at 0 with
    `--restart-schedule` (a fresh warm-up and cosine schedule, e.g. after changing the architecture's text inputs);
    the export's card is kept in `<run-dir>/init.json` and copied into this run's cards. Components the new model
    does not have (a T5 encoder) are ignored.
    """
    from diffusers import DiffusionPipeline

    exported = DiffusionPipeline.from_pretrained(args.init_from, local_files_only=True)
    for name, module in trained.items():
        module.load_state_dict(getattr(exported, name).state_dict())
        ema[name].load_state_dict(getattr(exported, name).state_dict())
    if args.text_encoders_from:  # e.g. the v1 encoders, which still tell count words apart, under a v2 denoiser
        donor = DiffusionPipeline.from_pretrained(args.text_encoders_from, local_files_only=True)
        for name in (name for name in trained if name.startswith("text_encoder")):
            if getattr(donor, name, None) is None:
                raise ValueError(f"--text-encoders-from {args.text_encoders_from}: it has no {name}")
            trained[name].load_state_dict(getattr(donor, name).state_dict())
            ema[name].load_state_dict(getattr(donor, name).state_dict())
    card = json.loads((Path(args.init_from) / "training.json").read_text())
    (run_dir / "init.json").write_text(json.dumps({"path": str(args.init_from), **card}, indent=2) + "\n")
    if args.restart_schedule:
        print(f"starting from {args.init_from} (trained {card['steps']} steps) at step 0", flush=True)
        return 0, 0.0
    print(f"continuing from {args.init_from} at step {card['steps']}", flush=True)
    return card["steps"], card["train_seconds"]


_LEGACY_EMA_NAMES = {"ema_text": "ema_text_encoder"}  # the first sd15 run's state files


def train_denoiser(args, trained: dict, frozen: dict, run_dir: Path, out: Path):
    path = run_dir / "t2i-state.pt"
    state = load_state(path)
    # --train-only: the other components stay as loaded (a diagnostic fine-tune: is it the text encoder or the
    # denoiser that must change?); their EMA copies then stay equal to them.
    chosen = set(args.train_only.split(",")) if args.train_only else set(trained)
    if chosen - set(trained):
        raise ValueError(f"--train-only {args.train_only!r}: expected components among {sorted(trained)}")
    for name, module in trained.items():
        module.requires_grad_(name in chosen)
    params = [p for name, module in trained.items() if name in chosen for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = {name: copy.deepcopy(module).requires_grad_(False) for name, module in trained.items()}
    step, elapsed = 0, 0.0
    if state is None and args.init_from:
        step, elapsed = init_from_export(args, trained, ema, run_dir)
    if state is not None:
        state = {_LEGACY_EMA_NAMES.get(k, k): v for k, v in state.items()}
        for name, module in trained.items():
            module.load_state_dict(state[name])
            ema[name].load_state_dict(state[f"ema_{name}"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    vae = frozen["vae"]
    vae.register_to_config(
        shift_factor=args.shift_factor if args.family == "sd3" else None, scaling_factor=args.scaling_factor
    )
    pipe = make_pipeline(args, trained, frozen)
    denoiser = trained["unet" if args.family == "sd15" else "transformer"]
    if args.family == "sd3":
        collapse_zero_padding(denoiser, STOCK_T5_ROWS)
    alphas = torch.as_tensor(
        __import__("diffusers").DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod, dtype=torch.float32
    )
    start, exported = time.time() - elapsed, None
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        images, captions, _ = render_batch(
            args.batch, seed=step, split=args.split, size=args.size, caption_dropout=0.1, noise=args.noise
        )
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
            latents = (latents - (args.shift_factor if args.family == "sd3" else 0.0)) * args.scaling_factor
        generator = torch.Generator().manual_seed(20_000_000 + step)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        noisy, target = noisy_and_target(args.family, latents, noise, t, alphas)
        prediction = predict(args.family, denoiser, noisy, t, encode_captions(pipe, args.family, captions))
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in trained.items():
                for e, p in zip(ema[name].parameters(), module.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        if step % 25 == 0:
            log(run_dir, {"stage": "t2i", "step": step, "loss": loss.item(), "time": time.time() - start})
            print(f"t2i step {step}/{args.steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            snapshot = {name: module.state_dict() for name, module in trained.items()}
            snapshot.update({f"ema_{name}": module.state_dict() for name, module in ema.items()})
            snapshot.update(optimizer=optimizer.state_dict(), step=step, elapsed=time.time() - start)
            save_state(path, snapshot)
        if step % args.export_every == 0 or step == args.steps:
            card = card_of(args, step, time.time() - start, run_dir)
            export(args, ema, frozen, out, card)
            if args.keep_exports:  # a curve over the run's exports needs each one, not only the latest
                export(args, ema, frozen, Path(args.keep_exports) / f"step-{step:06d}", card)
            exported = step
    if exported != step:  # a finished run re-run: write its export again (e.g. after a change of export format)
        export(args, ema, frozen, out, card_of(args, step, elapsed, run_dir))


def card_of(args, step: int, seconds: float, run_dir: Path) -> dict:
    card = {
        "family": args.family,
        "steps": step,
        "batch": args.batch,
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
        "world": WORLD_VERSION,
        "data": DATA_DESCRIPTION[args.captions],
        "caption_noise": {"level": args.noise_level, **args.noise.to_dict()} if args.noise else None,
        "caption_dropout": 0.1,
        "vae_steps": args.vae_steps,
        "shift_factor": args.shift_factor,
        "scaling_factor": args.scaling_factor,
        "lr": args.lr,
        "ema": args.ema,
        "seed": args.seed,
        "trained_components": args.train_only.split(",") if args.train_only else "all",
    }
    if args.text_encoders_from:
        card["text_encoders_from"] = str(args.text_encoders_from)
    if (run_dir / "init.json").exists():
        card["initialised_from"] = json.loads((run_dir / "init.json").read_text())
    return card


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=["sd15", "sd3"])
    parser.add_argument("--run-dir", default="runs/shapes-sd15")
    parser.add_argument("--out", default="models/shapes-sd15")
    parser.add_argument("--vae-from", help="Reuse a trained VAE state (vae-state.pt) instead of training one.")
    parser.add_argument("--init-from", help="An exported model to continue from when the run directory is empty.")
    parser.add_argument(
        "--text-encoders-from",
        help="With --init-from: take the text encoders from this other export (the rest from --init-from).",
    )
    parser.add_argument(
        "--restart-schedule", action="store_true", help="With --init-from: count steps (and the lr schedule) from 0."
    )
    parser.add_argument(
        "--captions",
        default="web",
        choices=["web", "clean"],
        help="web: every combination with web-like caption noise (softalign.shapes.captions); "
        "clean: perfect captions of the training split only (the v1 regime).",
    )
    parser.add_argument(
        "--noise-level", type=float, default=1.0, help="With --captions web: CaptionNoise.at_level(level)."
    )
    parser.add_argument(
        "--retrain-vae",
        action="store_true",
        help="With --init-from: fine-tune the exported VAE for --vae-steps on the current world's renders first "
        "(a VAE trained on another vocabulary cannot draw its new shapes and colours).",
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--export-every", type=int, default=500)
    parser.add_argument(
        "--train-only", help="Comma-separated components to train (e.g. unet, text_encoder); default: all of them."
    )
    parser.add_argument("--keep-exports", help="Also write each export to KEEP_EXPORTS/step-<k> (for curves).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # weight initialisation
    run_dir, out = Path(args.run_dir), Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    trained, frozen = build_models(args)
    args.split = "web" if args.captions == "web" else "train"
    args.noise = CaptionNoise.at_level(args.noise_level) if args.captions == "web" else None
    if args.vae_from:
        frozen["vae"].load_state_dict(load_state(Path(args.vae_from))["vae"])
    elif args.init_from:  # the exported VAE is the trained one, or the start of a fine-tune
        from diffusers import AutoencoderKL

        frozen["vae"].load_state_dict(AutoencoderKL.from_pretrained(Path(args.init_from) / "vae").state_dict())
        if args.retrain_vae:
            train_vae(args, frozen["vae"], run_dir)
    else:
        train_vae(args, frozen["vae"], run_dir)
    frozen["vae"].requires_grad_(False).eval()
    args.shift_factor, args.scaling_factor = latent_statistics(frozen["vae"], args)
    train_denoiser(args, trained, frozen, run_dir, out)


if __name__ == "__main__":
    main()
