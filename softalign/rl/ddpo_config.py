"""`DDPOConfig`: a DDPO run, with trl 0.23.1's field names so a TRL DDPO script moves over by changing imports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..version import __version__


@dataclass
class DDPOConfig:
    """Configuration of a [`DDPOTrainer`] run (DDPO, arXiv 2305.13301; flow models as Flow-GRPO, arXiv 2505.05470).

    Per epoch, each process draws `sample_num_batches_per_epoch * sample_batch_size` images (trajectories of
    `sample_num_steps` steps), scores them, normalises the rewards into advantages (per prompt when
    `per_prompt_stat_tracking`), then trains `train_num_inner_epochs` passes over them in batches of
    `train_batch_size`, each batch on `int(sample_num_steps * train_timestep_fraction)` of its timesteps. One optimiser
    step accumulates `train_gradient_accumulation_steps` batches times those timesteps.
    """

    output_dir: str = field(default="runs/ddpo", metadata={"help": "Run directory: config, checkpoints, adapters."})
    num_epochs: int = field(default=100, metadata={"help": "Sampling + training epochs."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling noise, prompts and shuffles."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each denoiser block in the backward pass (diffusers' enable_gradient_checkpointing): activation memory of one block instead of all, about a third more compute."
        },
    )
    log_with: str | None = field(default=None, metadata={"help": "An accelerate tracker (tensorboard, wandb, ...)."})
    sample_num_steps: int = field(default=50, metadata={"help": "Sampler steps per trajectory."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta (UNet families): > 0 for log-probs."})
    flow_noise_level: float = field(default=0.7, metadata={"help": "Flow-GRPO SDE noise level (SD3)."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance while sampling."})
    sample_batch_size: int = field(default=1, metadata={"help": "Trajectories per sampling batch per process."})
    sample_num_batches_per_epoch: int = field(default=2, metadata={"help": "Sampling batches per epoch."})
    resolution: int | None = field(default=None, metadata={"help": "Image side (default: the model's)."})
    negative_prompts: str = field(default="", metadata={"help": "Negative prompt of the unconditional branch."})
    train_batch_size: int = field(default=1, metadata={"help": "Trajectories per training batch."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each epoch's samples."})
    train_cfg: bool = field(default=True, metadata={"help": "Use classifier-free guidance in the training forward."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Clip advantages to +-this."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Share of timesteps trained per sample."})
    per_prompt_stat_tracking: bool = field(default=False, metadata={"help": "Normalise rewards per prompt."})
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata={"help": "Rewards kept per prompt."})
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata={"help": "Below this, use global stats."})
    async_reward_computation: bool = field(default=False, metadata={"help": "Score rewards in a thread pool."})
    max_workers: int = field(default=2, metadata={"help": "Threads of the async reward pool."})
    kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a KL penalty to the reference policy (the trained parameters as training began), "
            "Flow-GRPO's beta; 0, as TRL's DDPO, skips the reference forward."
        },
    )
    alongside_weight: float = field(default=0.0, metadata={"help": "Weight of the SoftAlign term added per step."})
    save_freq: int = field(default=1, metadata={"help": "Checkpoint every N epochs."})
    num_checkpoint_limit: int = field(default=5, metadata={"help": "Checkpoints kept."})
    resume_from: str | None = field(default=None, metadata={"help": "A checkpoint path or 'latest'."})
    softalign_version: str = field(default=__version__, metadata={"help": "Version that wrote the config."})

    def __post_init__(self):
        positive = (
            "num_epochs",
            "sample_num_steps",
            "sample_batch_size",
            "sample_num_batches_per_epoch",
            "train_batch_size",
            "train_gradient_accumulation_steps",
            "train_num_inner_epochs",
            "save_freq",
            "num_checkpoint_limit",
            "max_workers",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DDPOConfig.{name} must be a positive integer, got {value!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"DDPOConfig.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ValueError(
                f"DDPOConfig.train_timestep_fraction must lie in (0, 1], got {self.train_timestep_fraction}."
            )
        if not self.sample_eta > 0:
            raise ValueError(f"DDPOConfig.sample_eta must be > 0 (the log-probs need noise), got {self.sample_eta}.")
        if not self.flow_noise_level > 0:
            raise ValueError(f"DDPOConfig.flow_noise_level must be > 0, got {self.flow_noise_level}.")
        samples = self.sample_batch_size * self.sample_num_batches_per_epoch
        if samples % self.train_batch_size:
            raise ValueError(
                f"sample_batch_size * sample_num_batches_per_epoch ({samples}) must be a multiple of "
                f"train_batch_size ({self.train_batch_size})."
            )
        for name in ("train_learning_rate", "train_clip_range", "train_adv_clip_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DDPOConfig.{name} must be positive, got {getattr(self, name)!r}.")
        if self.kl_coef < 0:
            raise ValueError(f"DDPOConfig.kl_coef must be >= 0, got {self.kl_coef}.")
        if self.alongside_weight < 0:
            raise ValueError(f"DDPOConfig.alongside_weight must be >= 0, got {self.alongside_weight}.")

    @property
    def num_train_timesteps(self) -> int:
        """Timesteps trained per trajectory: `int(sample_num_steps * train_timestep_fraction)`, at least 1."""
        return max(1, int(self.sample_num_steps * self.train_timestep_fraction))

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)
