"""Tiny RL set-ups shared by the DDPO / Diffusion-DPO tests and the scripts they launch (multi-process, crash)."""

from __future__ import annotations

from PIL import Image
from shapes_data import shapes_pairs

from softalign import SoftTokens, SoftTokensConfig
from softalign.families import context_dim_of
from softalign.rl.ddpo_config import DDPOConfig


def brightness(images, prompts, metadata):
    """A reward any image has: its mean pixel value."""
    return images.mean(dim=(1, 2, 3)), {}


def tiny_ddpo_config(output_dir: str, **overrides) -> DDPOConfig:
    """2 epochs of 2 x 2 three-step trajectories at 32 px: seconds on a CPU."""
    settings = dict(
        output_dir=output_dir,
        num_epochs=2,
        sample_num_steps=3,
        sample_batch_size=2,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        resolution=32,
        train_learning_rate=1e-2,
    )
    settings.update(overrides)
    return DDPOConfig(**settings)


def tokens_for(pipe, family: str) -> SoftTokens:
    return SoftTokens(SoftTokensConfig.for_family(family, dim=context_dim_of(pipe), init="normal"))


def gaussian_lora():
    """A LoRA whose A and B both start non-zero, so it changes the output from the first step."""
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])


def white_rejected_preferences(n: int = 8) -> list[dict]:
    """Preferred: the render of its caption; rejected: an empty white image."""
    return [
        {"caption": caption, "chosen": image, "rejected": Image.new("RGB", image.size, "white")}
        for image, caption in shapes_pairs(n)
    ]
