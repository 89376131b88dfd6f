"""`DiffusionDPOConfig` and `DiffusionDPOTrainer`: Diffusion-DPO (arXiv 2311.12908) on soft tokens and/or a LoRA.

Data: (caption, preferred image, rejected image). Each pair shares one noise tensor and one t; the reference is the
same denoiser with the trained parameters at their starting values (LoRA adapters disabled, soft tokens swapped for a
frozen snapshot), so no second copy of the denoiser exists and the loss is ln 2 at initialisation.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import objectives
from ..checkpoints import read_training_files, resolve_checkpoint, save_checkpoint, write_training_files
from ..data import check_caption, iterable_examples, preprocess
from ..distributed import average_gradients, make_accelerator
from ..families import backbone_for
from ..run_lock import RunLock
from ..trainable import TrainableState
from ..version import __version__
from .save_model import SaveModelMixin


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
    seed: int = field(default=0, metadata={"help": "Seed of data order, t and noise."})
    resolution: int | None = field(default=None, metadata={"help": "Image side (default: the model's)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: int = field(default=3, metadata={"help": "Checkpoints kept."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint path or 'latest'."})
    alongside_weight: float = field(default=0.0, metadata={"help": "Weight of a SoftAlign term added per step."})
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


def preference_examples(data) -> list[dict]:
    """Rows `{"caption", "chosen", "rejected"}` (images as PIL, paths or bytes) from a list of dicts or a dataset."""
    rows = [data[i] for i in range(len(data))] if hasattr(data, "column_names") else list(data)
    examples = []
    for index, row in enumerate(rows):
        where = f"preference pair {index}"
        if not isinstance(row, dict) or not {"caption", "chosen", "rejected"} <= set(row):
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where}: expected keys 'caption', 'chosen' and 'rejected', got {found}.")
        caption = check_caption(row["caption"], where)
        chosen, rejected = iterable_examples([(row["chosen"], caption), (row["rejected"], caption)], name=where)
        examples.append({"caption": caption, "chosen": chosen, "rejected": rejected})
    if not examples:
        raise ValueError("The preference data is empty.")
    return examples


class DiffusionDPOTrainer(SaveModelMixin):
    """Diffusion-DPO on the parameters a SoftAlign stage trains (pass the same `soft_tokens` / pipeline on).

    Args:
        pipeline: an SD1.x/2.x, SDXL or SD3 pipeline (frozen).
        args ([`DiffusionDPOConfig`]).
        train_dataset: rows `{"caption", "chosen", "rejected"}` (see [`preference_examples`]).
        soft_tokens ([`SoftTokens`], *optional*) and/or peft_config (`peft.LoraConfig`, *optional*): what trains.
        alongside ([`SoftAlignTrainer`], *optional*): its objective is added with `args.alongside_weight` per step.
    """

    def __init__(
        self,
        pipeline,
        args: DiffusionDPOConfig,
        train_dataset,
        soft_tokens=None,
        peft_config=None,
        alongside=None,
        accelerator=None,
    ):
        self.args, self.pipe = args, pipeline
        self.backbone = backbone_for(pipeline)
        self.accelerator = accelerator or make_accelerator(args.mixed_precision, args.output_dir)
        if soft_tokens is None and peft_config is None:
            raise ValueError("DiffusionDPOTrainer needs parameters to train: soft_tokens and/or peft_config.")
        if args.alongside_weight > 0 and alongside is None:
            raise ValueError("alongside_weight > 0 needs an `alongside` SoftAlignTrainer.")
        self.examples = preference_examples(train_dataset)  # validate before touching the pipeline
        self.backbone.denoiser.requires_grad_(False)
        self.trainable = TrainableState(pipeline, soft_tokens, peft_config, two_banks=False, ema=False)
        self.reference_tokens = copy.deepcopy(soft_tokens).requires_grad_(False) if soft_tokens is not None else None
        self.soft_tokens, self.alongside = soft_tokens, alongside
        self.optimizer = torch.optim.AdamW(
            self.trainable.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
        )
        self.global_step, self.log_history = 0, []
        self.output_dir = Path(args.output_dir)
        self.data = None

    def prepare_data(self) -> dict:
        """Encode every image (posterior mean and std) and caption once."""
        per_step = self.args.train_batch_size * self.accelerator.num_processes
        if len(self.examples) < per_step:  # a rank would otherwise get an empty batch
            raise ValueError(
                f"{len(self.examples)} preference pairs, fewer than one batch ({self.args.train_batch_size} per "
                f"process x {self.accelerator.num_processes} processes)."
            )
        side = self.args.resolution or self.backbone.denoiser.config.sample_size * self.pipe.vae_scale_factor
        moments = {}
        for key in ("chosen", "rejected"):
            pixels = torch.stack([preprocess(e[key].load(), side, True, e[key].source) for e in self.examples])
            means, stds = zip(*[self.backbone.encode_image_moments(chunk) for chunk in pixels.split(16)], strict=True)
            moments[key] = (torch.cat(means), torch.cat(stds))
        captions = self.backbone.encode_prompts([e["caption"] for e in self.examples])
        self.data = {"moments": moments, "conditioning": {k: v.cpu() for k, v in captions.items()}}
        return self.data

    def _generator(self, step: int, micro: int) -> torch.Generator:
        seed = ((self.args.seed * 1_000_003 + step) * 1009 + micro) * 131 + self.accelerator.process_index
        return torch.Generator().manual_seed(seed)

    def _indices(self, step: int, micro: int) -> torch.Tensor:
        b, world, n = self.args.train_batch_size, self.accelerator.num_processes, len(self.examples)
        per_epoch = max(1, n // (b * world))
        epoch, position = divmod(step * self.args.gradient_accumulation_steps + micro, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + epoch))
        start = (position * world + self.accelerator.process_index) * b
        return order[start : start + b]

    def _micro_step(self, step: int, micro: int) -> dict:
        a, backbone, device = self.args, self.backbone, self.backbone.device
        generator = self._generator(step, micro)
        rows = self._indices(step, micro)
        latents = []
        for key in ("chosen", "rejected"):
            mean, std = self.data["moments"][key]
            latents.append(mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator))
        n = len(rows)
        t = torch.randint(a.min_timestep, a.max_timestep, (n,), generator=generator).repeat(2)  # shared per pair
        noise = torch.randn(latents[0].shape, generator=generator).repeat(2, 1, 1, 1)  # shared per pair
        x0 = torch.cat(latents).to(device)
        t, noise = t.to(device), noise.to(device)
        noisy = objectives.add_noise(x0, noise, t, backbone.prediction_type, backbone.alphas_cumprod)
        target = objectives.training_target(x0, noise, t, backbone.prediction_type, backbone.alphas_cumprod)
        cond = {k: v[rows].repeat(2, *([1] * (v.dim() - 1))).to(device) for k, v in self.data["conditioning"].items()}
        with self.accelerator.autocast():
            prediction = backbone.predict(noisy, t, cond).float()
        with torch.no_grad(), self.trainable.reference(self.reference_tokens), self.accelerator.autocast():
            reference = backbone.predict(noisy, t, cond).float()
        errors = (prediction - target).square().flatten(1).mean(1)
        ref_errors = (reference - target).square().flatten(1).mean(1)
        terms = objectives.diffusion_dpo_loss(*errors.split(n), *ref_errors.split(n), a.beta, a.loss_type)
        self.accelerator.backward(terms.loss / a.gradient_accumulation_steps)
        return {"loss": terms.loss.item(), "implicit_accuracy": terms.implicit_accuracy.item()}

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        a = self.args
        with RunLock(self.output_dir, enabled=self.accelerator.is_main_process):
            if self.data is None:
                self.prepare_data()
            if self.alongside is not None and self.alongside.data is None:
                self.alongside.prepare_data()
            checkpoint = resolve_checkpoint(self.output_dir, a.resume_from_checkpoint)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint)
            params = self.trainable.parameters()
            bar = tqdm(
                total=a.max_steps,
                initial=self.global_step,
                desc="diffusion-dpo",
                disable=not self.accelerator.is_local_main_process,
            )
            started = time.time()
            while self.global_step < a.max_steps:
                logs = {"loss": 0.0, "implicit_accuracy": 0.0}
                for micro in range(a.gradient_accumulation_steps):
                    for key, value in self._micro_step(self.global_step, micro).items():
                        logs[key] += value / a.gradient_accumulation_steps
                if self.alongside is not None and a.alongside_weight > 0:
                    self.alongside._micro_step(self.global_step, 0, loss_scale=a.alongside_weight)
                average_gradients(self.accelerator, params)
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_accuracy']:.2f}")
                if self.global_step % a.logging_steps == 0 or self.global_step == a.max_steps:
                    self.log_history.append({"step": self.global_step, "wall_seconds": time.time() - started, **logs})
                if (a.save_steps and self.global_step % a.save_steps == 0) or self.global_step == a.max_steps:
                    self.save_checkpoint()
            bar.close()
        return self.log_history

    def save_checkpoint(self):
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None

        def write(folder: Path):
            state = {"global_step": self.global_step, "log_history": self.log_history, "config": asdict(self.args)}
            write_training_files(folder, self.trainable, {"optimizer": self.optimizer}, state)

        return save_checkpoint(self.output_dir, self.global_step, write, self.args.save_total_limit)

    def _load_checkpoint(self, path: Path) -> None:
        state = read_training_files(path, self.trainable, {"optimizer": self.optimizer})
        self.global_step, self.log_history = state["global_step"], state["log_history"]
