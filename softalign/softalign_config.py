"""`SoftAlignConfig`: everything that describes one SoftAlign (AGSM / SoftREPA) training run."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_text
from .families import FAMILIES, training_defaults
from .version import __version__

# Paper defaults per family (METHOD.md sections 3-4; AGSM scripts/train_coco.sh; SoftREPA run_train.sh).
FAMILY_DEFAULTS = {family: training_defaults(family) for family in FAMILIES}
CHOICES = {
    "objective": ("agsm", "softrepa", "diffusion"),
    "preference": ("plackett_luce", "bradley_terry"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "linear"),
    "on_nonfinite_loss": ("stop", "skip"),
}


@dataclass
class SoftAlignConfig:
    """Configuration of a [`SoftAlignTrainer`] run (readable from YAML and the command line).

    Batch arithmetic: each optimiser step sees `train_batch_size * gradient_accumulation_steps * num_processes`
    images. Every image is paired with its own caption and `negatives_per_positive` captions of other images in its
    group of `negatives_per_positive + 1` images, so a step evaluates `images * (negatives_per_positive + 1)` pairs
    (twice that many denoiser calls for AGSM, which also runs the EMA tokens). With
    `train_batch_size == negatives_per_positive + 1` this is exactly the official grid (every image against every
    caption of the batch). The grid is evaluated `chunk_size` images at a time, so memory does not grow with the batch.
    """

    output_dir: str = field(
        default="runs/softalign", metadata={"help": "Run directory: config, logs, checkpoints, adapter."}
    )
    objective: str = field(
        default="agsm",
        metadata={
            "help": "agsm (the headline), softrepa (the contrastive baseline) or diffusion (plain fine-tuning: the "
            "diffusion loss on matched pairs only, one t and noise per image; negatives are not used)."
        },
    )
    negatives_per_positive: int = field(default=3, metadata={"help": "Negative captions per image (AGSM: 3)."})
    keep_groups: bool = field(
        default=False,
        metadata={
            "help": "Shuffle the dataset's consecutive groups of negatives_per_positive + 1 examples as wholes, so "
            "the dataset chooses each image's negatives (hard negatives); else examples are shuffled one by one."
        },
    )
    gamma_pos: float = field(default=1.0, metadata={"help": "AGSM tilt of the positive target."})
    gamma_neg: float | None = field(
        default=None, metadata={"help": "AGSM tilt of negatives (default: 1.0 SD1.x, 0.1 SDXL/SD3)."}
    )
    temperature: float = field(default=0.1, metadata={"help": "AGSM Plackett-Luce temperature T."})
    preference: str = field(default="plackett_luce", metadata={"help": "plackett_luce or bradley_terry (ablation)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "Decay of the EMA tokens that score the candidates."})
    softrepa_tau: float = field(default=0.07, metadata={"help": "SoftREPA logit temperature."})
    softrepa_scale: float = field(default=4.0, metadata={"help": "SoftREPA logit scale."})
    dweight: float | None = field(
        default=None, metadata={"help": "SoftREPA diffusion-loss weight (default 10 UNet, 0 SD3)."}
    )
    min_timestep: int = field(
        default=0, metadata={"help": "t ~ U{min_timestep .. max_timestep - 1}, one t per iteration."}
    )
    max_timestep: int = field(default=1000, metadata={"help": "Exclusive upper bound of t."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (both papers: 1e-3)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (both papers: 1e-4)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "constant, constant_with_warmup, cosine or linear."}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the schedule."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip the gradient norm (the papers do not)."})
    train_batch_size: int = field(default=4, metadata={"help": "Images per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    chunk_size: int = field(default=4, metadata={"help": "Images whose pairs go through the denoiser together."})
    max_steps: int = field(default=1000, metadata={"help": "Optimiser steps."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (autocast; tokens stay float32)."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each denoiser block in the backward pass (diffusers' enable_gradient_checkpointing): activation memory of one block instead of all, about a third more compute."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of tokens, data order, t and noise."})
    resolution: int | None = field(default=None, metadata={"help": "Training image side (default: the family's)."})
    center_crop: bool = field(
        default=True,
        metadata={
            "help": "Resize the short side to the resolution and centre-crop a square; false resizes the whole image "
            "to a square, ignoring its aspect ratio (no crop)."
        },
    )
    skip_bad_images: bool = field(
        default=False, metadata={"help": "Skip and count unreadable images instead of stopping."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "On-disk latent / text-embedding cache (reused across runs)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept (oldest deleted)."})
    sample_steps: int = field(default=0, metadata={"help": "Save sample images every N steps (0: never)."})
    sample_prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts of the periodic samples."})
    report_to: str = field(default="none", metadata={"help": "Tracker: none, tensorboard, wandb, ... (accelerate's)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint path or 'latest'."})
    on_nonfinite_loss: str = field(default="stop", metadata={"help": "stop or skip a step whose loss is NaN/Inf."})
    softalign_version: str = field(default=__version__, metadata={"help": "Version that wrote the config."})

    def __post_init__(self):
        _check_types(self)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SoftAlignConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        positive_ints = (
            "negatives_per_positive",
            "train_batch_size",
            "gradient_accumulation_steps",
            "chunk_size",
            "max_steps",
            "logging_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SoftAlignConfig.{name} must be a positive integer, got {value!r}.")
        group = self.negatives_per_positive + 1
        if self.train_batch_size % group:
            raise ValueError(
                f"SoftAlignConfig.train_batch_size ({self.train_batch_size}) must be a multiple of "
                f"negatives_per_positive + 1 ({group}): each image needs {self.negatives_per_positive} other captions "
                "from its group."
            )
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"Need 0 <= min_timestep < max_timestep <= 1000, got {self.min_timestep} and {self.max_timestep}."
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"SoftAlignConfig.ema_decay must lie in [0, 1), got {self.ema_decay!r}.")
        for name in ("learning_rate", "temperature", "softrepa_tau", "softrepa_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SoftAlignConfig.{name} must be positive, got {getattr(self, name)!r}.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"SoftAlignConfig.{f.name} must be a finite number, got {value!r}.")
        for name in ("gamma_pos", "gamma_neg", "dweight", "weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"SoftAlignConfig.{name} must be >= 0, got {value!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"SoftAlignConfig.max_grad_norm must be positive or None, got {self.max_grad_norm!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SoftAlignConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}.")
        if not self.adam_epsilon > 0:
            raise ValueError(f"SoftAlignConfig.adam_epsilon must be positive, got {self.adam_epsilon!r}.")
        if self.save_steps < 0 or self.sample_steps < 0 or self.lr_warmup_steps < 0:
            raise ValueError("save_steps, sample_steps and lr_warmup_steps must be >= 0.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"SoftAlignConfig.save_total_limit must be >= 1 or None, got {self.save_total_limit!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"SoftAlignConfig.resolution must be a multiple of 8, got {self.resolution!r}.")

    def resolved(self, family: str) -> SoftAlignConfig:
        """A copy with the family's paper defaults filled in where the field is `None`."""
        defaults = training_defaults(family)
        values = {k: defaults[k] for k in ("gamma_neg", "dweight", "resolution") if getattr(self, k) is None}
        return dataclasses.replace(self, **values)

    # -- files --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON atomically (a failed write leaves the previous file intact)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> SoftAlignConfig:
        """Build from a dict of fields; unknown keys (from a newer version) are dropped with a warning."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of SoftAlignConfig fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))  # YAML keys need not be strings
        if unknown:
            warnings.warn(f"{source}: ignoring unknown SoftAlignConfig keys {unknown}.", stacklevel=2)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as error:
            raise ValueError(f"{source}: {error}") from error

    @classmethod
    def from_file(cls, path: str | Path) -> SoftAlignConfig:
        """Read a YAML or JSON file of fields."""
        from .training import read_config_file

        data = read_config_file(path, "SoftAlignConfig")
        return cls.from_dict(data, source=str(path))


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list[str]": (list,)}


def _check_types(config) -> None:
    """Reject values of the wrong type (YAML and Python callers bypass argparse) with the field's name."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        base = annotation.removesuffix("|None")
        if value is None and optional:
            continue
        allowed = _TYPES.get(base)
        if allowed is None:
            continue
        if isinstance(value, bool) and base != "bool" or not isinstance(value, allowed):
            raise ValueError(
                f"SoftAlignConfig.{f.name} must be of type {base}{' or None' if optional else ''}, "
                f"got {value!r} ({type(value).__name__})."
            )
        if base == "list[str]" and not all(isinstance(v, str) for v in value):
            raise ValueError(f"SoftAlignConfig.{f.name} must be a list of strings, got {value!r}.")
