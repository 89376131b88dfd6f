"""`DiffusionDPOTrainer`: Diffusion-DPO (arXiv 2311.12908) on soft tokens and/or a LoRA.

Data: (caption, preferred image, rejected image). Each pair shares one noise tensor and one t; the reference is the
same denoiser with the trained parameters at their starting values (LoRA adapters disabled, soft tokens swapped for a
frozen snapshot), so no second copy of the denoiser exists and the loss is ln 2 at initialisation.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import objectives
from ..checkpointing import enable_gradient_checkpointing
from ..data import check_caption, iterable_examples, preprocess
from ..families import backbone_for, freeze, image_side
from ..run_lock import RunLock
from ..soft_tokens import SoftTokens
from ..softalign_trainer import AlignmentTerm, SoftAlignTrainer, as_alignment_term
from ..trainable import TrainedParameters
from ..training import (
    TrainerState,
    average_gradients,
    finish_trackers,
    log_to_trackers,
    make_accelerator,
    read_training_files,
    resolve_checkpoint,
    save_checkpoint,
    save_run_config,
    save_trained,
    start_trackers,
    step_generator,
    write_training_files,
)
from .diffusion_dpo_config import DiffusionDPOConfig

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

RUN_CONFIG_NAME = "diffusion_dpo_config.json"
ALONGSIDE_FILE = "alongside.safetensors"


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


class DiffusionDPOTrainer:
    """Diffusion-DPO on the parameters a SoftAlign stage trains (pass the same `soft_tokens` / pipeline on).

    Args:
        pipeline: an SD1.x/2.x, SDXL or SD3 pipeline (frozen).
        args ([`DiffusionDPOConfig`]).
        train_dataset: rows `{"caption", "chosen", "rejected"}` (see [`preference_examples`]).
        soft_tokens ([`SoftTokens`], *optional*) and/or peft_config (`peft.LoraConfig`, *optional*): what trains.
        alongside ([`SoftAlignTrainer`] or [`AlignmentTerm`], *optional*): its objective is added with
            `args.alongside_weight` per step, its EMA tokens follow each step (AGSM), and its tensors are checkpointed.
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        args: DiffusionDPOConfig,
        train_dataset: Iterable[dict],
        soft_tokens: SoftTokens | None = None,
        peft_config: LoraConfig | None = None,
        alongside: SoftAlignTrainer | AlignmentTerm | None = None,
        accelerator=None,
    ):
        self.args, self.pipe = args, pipeline
        self.backbone = backbone_for(pipeline)
        self.accelerator = accelerator or make_accelerator(args.mixed_precision, args.output_dir, args.report_to)
        if soft_tokens is None and peft_config is None:
            raise ValueError("DiffusionDPOTrainer needs parameters to train: soft_tokens and/or peft_config.")
        if args.alongside_weight > 0 and alongside is None:
            raise ValueError("alongside_weight > 0 needs an `alongside` SoftAlignTrainer.")
        self.examples = preference_examples(train_dataset)  # validate before touching the pipeline
        freeze(pipeline)
        if self.args.gradient_checkpointing:  # the denoiser's own mechanism; soft-token hooks see positional calls too
            enable_gradient_checkpointing(self.backbone.denoiser)
        self.trained = TrainedParameters(pipeline, soft_tokens, peft_config, two_banks=False, ema=False)
        self.reference_tokens = copy.deepcopy(soft_tokens).requires_grad_(False) if soft_tokens is not None else None
        self.soft_tokens, self.alongside = soft_tokens, as_alignment_term(alongside)
        self.optimizer = torch.optim.AdamW(
            self.trained.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
        )
        self.state = TrainerState()
        self.output_dir = Path(args.output_dir)
        self.data = None

    # -- the shared trainer surface -------------------------------------------------------------------------------
    @property
    def trainable(self) -> TrainedParameters:
        """Deprecated alias of `trained` (removed in the next release)."""
        warnings.warn("DiffusionDPOTrainer.trainable is deprecated; use .trained.", DeprecationWarning, stacklevel=2)
        return self.trained

    @property
    def global_step(self) -> int:
        """Optimiser steps taken (`state.global_step`)."""
        return self.state.global_step

    @property
    def log_history(self) -> list[dict]:
        """The logged records (`state.log_history`)."""
        return self.state.log_history

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the trained parameters: soft tokens to `output_dir` (default `<output_dir>/adapter`) in the adapter
        format, the LoRA (when trained) to `<its parent>/lora/softalign/`; load them with `load_soft_tokens` and
        `load_lora`. The run config is saved beside them."""
        return save_trained(
            self.accelerator, self.trained, output_dir, self.output_dir, config=self.args, config_name=RUN_CONFIG_NAME
        )

    def prepare_data(self) -> dict:
        """Encode every image (posterior mean and std) and caption once."""
        per_step = self.args.train_batch_size * self.accelerator.num_processes
        if len(self.examples) < per_step:  # a rank would otherwise get an empty batch
            raise ValueError(
                f"{len(self.examples)} preference pairs, fewer than one batch ({self.args.train_batch_size} per "
                f"process x {self.accelerator.num_processes} processes)."
            )
        side = self.args.resolution or image_side(self.pipe)
        moments = {}
        for key in ("chosen", "rejected"):
            pixels = torch.stack([preprocess(e[key].load(), side, True, e[key].source) for e in self.examples])
            means, stds = zip(*[self.backbone.encode_image_moments(chunk) for chunk in pixels.split(16)], strict=True)
            moments[key] = (torch.cat(means), torch.cat(stds))
        captions = self.backbone.encode_prompts([e["caption"] for e in self.examples])
        self.data = {"moments": moments, "conditioning": {k: v.cpu() for k, v in captions.items()}}
        return self.data

    def _generator(self, step: int, micro: int) -> torch.Generator:
        return step_generator(self.args.seed, step, micro, self.accelerator.process_index)

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
        noise = torch.randn(latents[0].shape, generator=generator)
        noise = noise.repeat(2, *([1] * (noise.dim() - 1)))  # shared per pair; (B, C, H, W) or packed (B, L, C)
        x0 = torch.cat(latents)
        t = backbone.training_timesteps(t, x0)  # the family's schedule (FLUX.1 shifts the levels; others: t)
        x0 = x0.to(device)
        t, noise = t.to(device), noise.to(device)
        noisy = backbone.add_noise(x0, noise, t)
        target = backbone.training_target(x0, noise, t)
        cond = {k: v[rows].repeat(2, *([1] * (v.dim() - 1))).to(device) for k, v in self.data["conditioning"].items()}
        with self.accelerator.autocast():
            prediction = backbone.predict(noisy, t, cond).float()
        with torch.no_grad(), self.trained.reference(self.reference_tokens), self.accelerator.autocast():
            reference = backbone.predict(noisy, t, cond).float()
        errors = (prediction - target).square().flatten(1).mean(1)
        ref_errors = (reference - target).square().flatten(1).mean(1)
        terms = objectives.diffusion_dpo_loss(*errors.split(n), *ref_errors.split(n), a.beta, a.loss_type)
        self.accelerator.backward(terms.loss / a.gradient_accumulation_steps)
        return {"loss": terms.loss.item(), "implicit_accuracy": terms.implicit_accuracy.item()}

    def train(self) -> TrainerState:
        """Run (or resume, with `args.resume_from_checkpoint`) Diffusion-DPO up to `args.max_steps` optimiser steps.

        Returns:
            [`TrainerState`]: `global_step` and `log_history` (one record per `logging_steps`).
        """
        from tqdm.auto import tqdm

        a = self.args
        with RunLock(self.output_dir, enabled=self.accelerator.is_main_process):
            if self.data is None:
                self.prepare_data()
            if self.alongside is not None:
                self.alongside.prepare()
            checkpoint = resolve_checkpoint(self.output_dir, a.resume_from_checkpoint)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint)
            if self.accelerator.is_main_process:
                save_run_config(a, self.output_dir / RUN_CONFIG_NAME)
            start_trackers(self.accelerator, "softalign-diffusion-dpo", a.to_dict())
            params = self.trained.parameters()
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
                    alongside = self.alongside.backward(self.global_step, a.alongside_weight)
                    logs["alongside_loss"] = alongside["loss"]
                average_gradients(self.accelerator, params)
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.alongside is not None:
                    self.alongside.after_optimizer_step()
                self.state.global_step += 1
                step = self.global_step
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_accuracy']:.2f}")
                if step % a.logging_steps == 0 or step == a.max_steps:
                    self.state.log_history.append({"step": step, "wall_seconds": time.time() - started, **logs})
                    log_to_trackers(self.accelerator, logs, step)
                if (a.save_steps and step % a.save_steps == 0) or step == a.max_steps:
                    self.save_checkpoint()
            bar.close()
            finish_trackers(self.accelerator)
        return self.state

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-<step>` (atomic, with an integrity record), with the alongside term's tensors (EMA
        included); keeps `save_total_limit` of them."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        from safetensors.torch import save_file

        def write(folder: Path):
            state = {"global_step": self.global_step, "log_history": self.log_history, "config": self.args.to_dict()}
            write_training_files(folder, self.trained, {"optimizer": self.optimizer}, state)
            if self.alongside is not None:
                save_file(self.alongside.state_dict(), str(folder / ALONGSIDE_FILE))

        return save_checkpoint(self.output_dir, self.global_step, write, self.args.save_total_limit)

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = read_training_files(path, self.trained, {"optimizer": self.optimizer})
        if self.alongside is not None and (path / ALONGSIDE_FILE).is_file():
            self.alongside.load_state_dict(load_file(str(path / ALONGSIDE_FILE)))
        self.state = TrainerState(state["global_step"], state["log_history"])
