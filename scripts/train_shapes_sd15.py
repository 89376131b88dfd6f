"""Train the shipped SD1.x-family shapes model from scratch on a CPU: a VAE, then the UNet and the text encoder.

    python scripts/train_shapes_sd15.py --run-dir runs/shapes-sd15 --out models/shapes-sd15 [--threads 1]

Resumable: every `--save-every` steps the full training state (weights, EMA, optimiser, step) is written atomically
to `<run-dir>/<stage>-state.pt`, and re-running the same command continues from it. The EMA weights are exported as a
`StableDiffusionPipeline` to `--out` every `--export-every` steps, so a usable model exists at any time. Data are
shapes-world renders of the training split, drawn from a seed per step (a resumed run sees the same batches).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from softalign.atomic import atomic_directory
from softalign.shapes.data import render_batch
from softalign.testing.tokenizers import clip_tokenizer

TEXT_LENGTH = 24  # longest shapes-world caption is 14 CLIP tokens with BOS/EOS


def build_models(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(model_max_length=TEXT_LENGTH)
    vae = AutoencoderKL(
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
    vocab = len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            projection_dim=128,
        )
    )
    unet = UNet2DConditionModel(
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
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    return tokenizer, vae, text_encoder, unet, scheduler


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        images, _, _ = render_batch(args.vae_batch, seed=10_000_000 + step, size=args.size)
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
            log(run_dir, {"stage": "vae", "step": step, "loss": loss.item(), "kl": kl.item(), "time": time.time() - start})
            print(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f}", flush=True)
        if step % args.save_every == 0 or step == args.vae_steps:
            save_state(path, {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step})
    vae.requires_grad_(False).eval()


@torch.no_grad()
def latent_scale(vae, args) -> float:
    images, _, _ = render_batch(256, seed=999, size=args.size)
    latents = vae.encode(images).latent_dist.mean
    return float(1.0 / latents.flatten().std())


def encode_text(tokenizer, text_encoder, captions):
    ids = tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids)[0]


def export(args, tokenizer, vae, text_encoder, unet, out: Path, card: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
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
    with atomic_directory(out) as staging:
        pipe.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(card, indent=2) + "\n")


def train_t2i(args, tokenizer, vae, text_encoder, unet, scheduler, run_dir: Path, out: Path):
    path = run_dir / "t2i-state.pt"
    state = load_state(path)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    step, elapsed = 0, 0.0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    scale = args.scaling_factor
    vae.register_to_config(scaling_factor=scale)
    start = time.time() - elapsed
    alphas = scheduler.alphas_cumprod
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        images, captions, _ = render_batch(args.batch, seed=step, size=args.size, caption_dropout=0.1)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * scale
        generator = torch.Generator().manual_seed(20_000_000 + step)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy = a * latents + s * noise
        pred = unet(noisy, t, encoder_hidden_states=encode_text(tokenizer, text_encoder, captions)).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_model, model in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema_model.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        if step % 25 == 0:
            record = {"stage": "t2i", "step": step, "loss": loss.item(), "time": time.time() - start}
            log(run_dir, record)
            print(f"t2i step {step}/{args.steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_state(
                path,
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "elapsed": time.time() - start,
                },
            )
        if step % args.export_every == 0 or step == args.steps:
            card = {
                "steps": step,
                "batch": args.batch,
                "train_seconds": round(time.time() - start, 1),
                "threads": args.threads,
                "data": "shapes world, training split (softalign.shapes.prompts.split_prompts('train')), seed = step",
                "vae_steps": args.vae_steps,
                "scaling_factor": scale,
                "lr": args.lr,
                "ema": args.ema,
            }
            export(args, tokenizer, vae, ema_text, ema_unet, out, card)
            print(f"exported {out} at step {step}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/shapes-sd15")
    parser.add_argument("--out", default="models/shapes-sd15")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--export-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # weight initialisation
    run_dir, out = Path(args.run_dir), Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, vae, text_encoder, unet, scheduler = build_models(args)
    train_vae(args, vae, run_dir)
    args.scaling_factor = latent_scale(vae, args)
    train_t2i(args, tokenizer, vae, text_encoder, unet, scheduler, run_dir, out)


if __name__ == "__main__":
    main()
