"""`DiffusionDPOConfig`: everything that describes one Diffusion-DPO run (arXiv 2311.12908)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..version import __version__


@dataclass
class DiffusionDPOConfig:
    """Configuration of a [`DiffusionDPOTrainer`] run. An optimiser step sees
    `train_batch_size * gradient_accumulation_steps * num_processes` preference pairs."""

    output_dir: str = field(default="runs/diffusion-dpo", metadata={"help": "Run directory."})
    beta: float = field(default=5000.0, metadata={"help": "KL strength beta (2000-5000 for SD1.5 in the paper)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    train_batch_size: int = field(default=4, metadata={"help": "Pairs per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_steps: int = field(default=500, metadata={"help": "Optimiser steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    min_timestep: int = field(default=0, metadata={"help": "t ~ U{min .. max - 1} per pair."})
    max_timestep: int = field(default=1000, metadata={"help": "Exclusive upper bound of t."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each denoiser block in the backward pass (diffusers' enable_gradient_checkpointing): activation memory of one block instead of all, about a third more compute."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order, t and noise."})
    resolution: int | None = field(default=None, metadata={"help": "Image side (default: the model's)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: int = field(default=3, metadata={"help": "Checkpoints kept."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint path or 'latest'."})
    alongside_weight: float = field(default=0.0, metadata={"help": "Weight of a SoftAlign term added per step."})
    report_to: str = field(default="none", metadata={"help": "Tracker: none, tensorboard, wandb, ... (accelerate's)."})
    softalign_version: str = field(default=__version__, metadata={"help": "Version that wrote the config."})

    def __post_init__(self):
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"DiffusionDPOConfig.loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}.")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_steps", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffusionDPOConfig.{name} must be a positive integer, got {value!r}.")
        if not self.beta > 0 or not self.learning_rate > 0:
            raise ValueError(f"beta and learning_rate must be positive, got {self.beta} and {self.learning_rate}.")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"Need 0 <= min_timestep < max_timestep <= 1000, got {self.min_timestep}, {self.max_timestep}."
            )

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)
