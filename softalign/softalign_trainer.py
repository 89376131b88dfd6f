"""`SoftAlignTrainer`: the reward-free soft-token stage (AGSM, SoftREPA) as one composable, resumable trainer.

One optimiser step (see METHOD.md section 2 and DESIGN.md "Data flow"):
1. a batch of cached latents and caption conditioning; one t and one noise tensor shared by every pair;
2. the pair grid: every image against the captions of its group (its own = positive, the others = negatives);
3. in chunks of `chunk_size` images: online predictions (psi+ rows for positives, psi- for negatives) and, for AGSM,
   EMA predictions without gradient; the chunk's share of the objective is backpropagated at once;
4. gradients averaged over processes, clipped, AdamW step on the trained parameters only, EMA update, log.

Randomness (data order, t, noise, latent samples) is a pure function of (seed, step, micro-batch, process), so a
resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import objectives
from .alignment_term import AlignmentTerm, as_alignment_term  # noqa: F401 (re-exported)
from .cache import EncodingCache
from .checkpointing import enable_gradient_checkpointing
from .data import as_examples, distinct_caption_order, shared_caption_warning
from .families import backbone_for, freeze
from .run_lock import RunLock
from .soft_tokens import SoftTokens
from .softalign_config import SoftAlignConfig
from .trainable import TrainedParameters
from .training import (
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

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

RUN_CONFIG_NAME = "softalign_config.json"


class SoftAlignTrainer:
    """Train soft tokens (and/or a LoRA) with AGSM or SoftREPA on image-caption pairs.

    Args:
        pipeline: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline` (its weights
            stay frozen; only the soft tokens / LoRA train).
        args ([`SoftAlignConfig`]): the run configuration.
        train_dataset: an image folder path, a `datasets.Dataset`, or an iterable of `(image, caption)`.
        soft_tokens ([`SoftTokens`], *optional*): tokens to train (e.g. from an earlier stage); new ones with the
            family's official configuration when neither this nor `peft_config` is given.
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA on the denoiser (two adapters for AGSM).
        callbacks (`list`, *optional*): objects with any of `on_step_end(trainer, logs)`, `on_save(trainer, path)`,
            `on_train_end(trainer)`.

    Example:
        ```py
        >>> from softalign import SoftAlignConfig, SoftAlignTrainer
        >>> trainer = SoftAlignTrainer(pipe, SoftAlignConfig(output_dir="runs/agsm", max_steps=500), "data/coco")
        >>> trainer.train()
        >>> trainer.save_model()  # runs/agsm/adapter
        ```
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        args: SoftAlignConfig,
        train_dataset: str | os.PathLike | Iterable,
        soft_tokens: SoftTokens | None = None,
        peft_config: LoraConfig | None = None,
        callbacks: list | None = None,
        accelerator=None,
    ):
        self.pipe = pipeline
        self.backbone = backbone_for(pipeline)
        self.args = args.resolved(self.backbone.family)
        self.accelerator = accelerator or make_accelerator(
            self.args.mixed_precision, self.args.output_dir, self.args.report_to
        )
        self.callbacks = list(callbacks or [])
        self.state = TrainerState()
        self.output_dir = Path(self.args.output_dir)
        agsm = self.args.objective == "agsm"
        if soft_tokens is None and peft_config is None:
            soft_tokens = self._new_soft_tokens()
        if soft_tokens is not None and agsm and soft_tokens.n_banks < 2:
            raise ValueError("AGSM needs soft tokens with two banks (psi+, psi-); these have one.")
        freeze(pipeline)
        if self.args.gradient_checkpointing:  # the denoiser's own mechanism; soft-token hooks see positional calls too
            enable_gradient_checkpointing(self.backbone.denoiser)
        self.trained = TrainedParameters(pipeline, soft_tokens, peft_config, two_banks=agsm, ema=agsm)
        self.soft_tokens = soft_tokens
        self.peft_config = peft_config
        self.examples = as_examples(train_dataset)
        self.optimizer = torch.optim.AdamW(
            self.trained.parameters(),
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            self.args.lr_scheduler,
            self.optimizer,
            num_warmup_steps=self.args.lr_warmup_steps,
            num_training_steps=self.args.max_steps,
        )
        self.data = None
        self.should_stop = False  # a callback may set it to end train() after the current step

    def _new_soft_tokens(self) -> SoftTokens:
        torch.manual_seed(self.args.seed)  # the same initial tokens on every process
        return SoftTokens.for_pipeline(self.pipe, objective=self.args.objective)

    # -- derived quantities -------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of processes."""
        return self.accelerator.num_processes

    @property
    def trainable(self) -> TrainedParameters:
        """Deprecated alias of `trained` (removed in the next release)."""
        warnings.warn("SoftAlignTrainer.trainable is deprecated; use .trained.", DeprecationWarning, stacklevel=2)
        return self.trained

    def alignment_term(self) -> AlignmentTerm:
        """This trainer's objective as a term for another trainer's step ("alongside"; see [`AlignmentTerm`])."""
        return AlignmentTerm(self)

    def derived(self) -> dict:
        """Deprecated alias of [`batch_summary`] (removed in the next release)."""
        warnings.warn(
            "SoftAlignTrainer.derived() is deprecated; use batch_summary().", DeprecationWarning, stacklevel=2
        )
        return self.batch_summary()

    def batch_summary(self) -> dict:
        """The run's batch arithmetic, logged at start-up: images, pairs and denoiser rows per optimiser step, the
        trained parameter count and the number of usable examples."""
        a = self.args
        images = a.train_batch_size * a.gradient_accumulation_steps * self.world_size
        pairs = images * self.group_size
        return {
            "images_per_step": images,
            "pairs_per_step": pairs,
            "denoiser_rows_per_step": pairs * (2 if a.objective == "agsm" else 1),
            "trainable_parameters": sum(p.numel() for p in self.trained.parameters()),
            "examples": len(self.data) if self.data is not None else len(self.examples),
        }

    # -- data ---------------------------------------------------------------------------------------------------
    def prepare_data(self):
        """Encode (or reuse from the cache) every example once; only the main process encodes."""
        cache_dir = self.args.cache_dir or str(self.output_dir / "cache")
        cache = EncodingCache(cache_dir, self.pipe, self.backbone, self.args.resolution, self.args.center_crop)
        with self.accelerator.main_process_first():
            self.data = cache.encode(self.examples, skip_bad_images=self.args.skip_bad_images)
        group = self.args.negatives_per_positive + 1  # with keep_groups, the dataset's groups must all be whole
        if self.args.keep_groups and (len(self.data) != len(self.examples) or len(self.examples) % group):
            raise ValueError(
                f"keep_groups needs every one of the dataset's groups of {group} examples intact: "
                f"{len(self.examples)} examples, {len(self.data)} usable. Fix or drop the unreadable images, or make "
                f"the dataset a multiple of {group} long."
            )
        self._check_captions()
        per_step = self.args.train_batch_size * self.world_size
        if len(self.data) < per_step:
            raise ValueError(
                f"{len(self.data)} usable examples, fewer than one batch ({self.args.train_batch_size} per process x "
                f"{self.world_size} processes)."
            )
        return self.data

    @property
    def group_size(self) -> int:
        """Captions each image is scored against: itself and its negatives (1 for the plain diffusion loss)."""
        return 1 if self.args.objective == "diffusion" else self.args.negatives_per_positive + 1

    def _check_captions(self) -> None:
        """Warn, with counts, when images share a caption (see [`shared_caption_warning`])."""
        if self.args.objective == "diffusion":
            return  # no negatives: a shared caption is just data
        message = shared_caption_warning(
            self.data.caption_rows.tolist(), self.args.negatives_per_positive + 1, self.args.keep_groups
        )
        if message is not None:
            warnings.warn(message, stacklevel=3)

    def _generator(self, step: int, micro: int) -> torch.Generator:
        return step_generator(self.args.seed, step, micro, self.accelerator.process_index)

    def _batch_indices(self, step: int, micro: int) -> torch.Tensor:
        """Examples of this process's micro-batch: an epoch-seeded permutation, cut into consecutive batches."""
        b, world = self.args.train_batch_size, self.world_size
        per_epoch = len(self.data) // (b * world)
        counter = step * self.args.gradient_accumulation_steps + micro
        epoch, position = divmod(counter, per_epoch)
        generator = torch.Generator().manual_seed(self.args.seed + epoch)
        if self.args.keep_groups:  # whole groups move, so each image meets the negatives the dataset put beside it
            group = self.args.negatives_per_positive + 1
            groups = torch.randperm(len(self.data) // group, generator=generator)
            order = (groups[:, None] * group + torch.arange(group)).reshape(-1)
        else:
            order = self._distinct_caption_order(epoch, torch.randperm(len(self.data), generator=generator))
        start = (position * world + self.accelerator.process_index) * b
        return order[start : start + b]

    def _distinct_caption_order(self, epoch: int, order: torch.Tensor) -> torch.Tensor:
        """`order` with each group's captions distinct where the data allow it (computed once per epoch)."""
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            group = self.args.negatives_per_positive + 1
            self._order_cache = (epoch, distinct_caption_order(order, self.data.caption_rows, group))
        return self._order_cache[1]

    # -- one micro-batch ------------------------------------------------------------------------------------------
    def alignment_loss(self, step: int) -> torch.Tensor:
        """The objective on the micro-batch of `step` as a tensor with its graph (no backward), for trainers that add
        it to their own loss; the same as `trainer.alignment_term().loss(step)`."""
        return self.alignment_term().loss(step)

    def _micro_step(self, step: int, micro: int, loss_scale: float | None = None) -> dict:
        """Forward and backward of one micro-batch, chunk by chunk; gradients are scaled by `loss_scale` (default:
        1 / accumulation steps). Returns the micro-batch's loss and diagnostics."""
        loss_scale = 1.0 / self.args.gradient_accumulation_steps if loss_scale is None else loss_scale
        totals = {"loss": 0.0, "win_rate": 0.0, "weight_margin": 0.0, "reward_margin": 0.0}
        for loss, diagnostics, share in self._chunk_losses(step, micro):
            self.accelerator.backward(loss * loss_scale)
            totals["loss"] += loss.item()
            for key, value in diagnostics.items():
                totals[key] += value * share
        return totals

    def _chunk_losses(self, step: int, micro: int):
        """Yields `(loss, diagnostics, share)` per chunk of the micro-batch of `step`: the chunk's part of the objective
        (with its graph), its diagnostics, and its share of the micro-batch's images."""
        a, backbone, device = self.args, self.backbone, self.backbone.device
        generator = self._generator(step, micro)
        latents, conditioning = self.data.batch(self._batch_indices(step, micro), generator)
        if a.objective == "diffusion":  # plain fine-tuning: its own t and noise per image, as diffusers' scripts do
            t = torch.randint(a.min_timestep, a.max_timestep, (latents.shape[0],), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
        else:  # one t and one noise tensor for every pair, so the pairs' errors compare like with like
            t = torch.randint(a.min_timestep, a.max_timestep, (1,), generator=generator).expand(latents.shape[0])
            noise = torch.randn((1, *latents.shape[1:]), generator=generator).expand_as(latents)
        t = backbone.training_timesteps(t, latents)  # the family's schedule (FLUX.1 shifts the levels; others: t)
        latents, noise, t = latents.to(device), noise.to(device), t.to(device)
        noisy = backbone.add_noise(latents, noise, t)
        target = backbone.training_target(latents, noise, t)
        conditioning = {k: v.to(device) for k, v in conditioning.items()}
        n_images, group = latents.shape[0], self.group_size
        for start in range(0, n_images, a.chunk_size):
            images = torch.arange(start, min(start + a.chunk_size, n_images), device=device)
            loss, diagnostics = self._chunk_loss(images, group, noisy, target, t, conditioning, n_images)
            yield loss, diagnostics, len(images) / n_images

    def _chunk_loss(self, images, group, noisy, target, t, conditioning, n_images):
        a = self.args
        # (n, K) caption rows of each image; every index lives on the denoiser's device, like the tensors it picks from
        candidates = (images // group)[:, None] * group + torch.arange(group, device=images.device)
        labels = images % group
        image_rows = images[:, None].expand_as(candidates).reshape(-1)
        caption_rows = candidates.reshape(-1)
        banks = (caption_rows != image_rows).long() if a.objective == "agsm" else torch.zeros_like(caption_rows)
        shape = (len(images), group, *noisy.shape[1:])

        def predict(index):
            rows = image_rows[index]
            cond = {k: v[caption_rows[index]] for k, v in conditioning.items()}
            with self.accelerator.autocast():
                return self.backbone.predict(noisy[rows], t[rows], cond).float()

        prediction = self.trained.route(predict, banks).reshape(shape)
        if a.objective == "diffusion":
            errors = (prediction[:, 0] - target[images]).pow(2).flatten(1).mean(1)  # each image's MSE
            return errors.sum() / n_images, {}
        if a.objective == "softrepa":
            errors = objectives.pair_errors(prediction, target[images][:, None])
            rows = objectives.softrepa_rows(errors, labels, a.softrepa_tau, a.softrepa_scale, a.dweight)
            logits = a.softrepa_scale * torch.exp(-errors.detach() / a.softrepa_tau)
            diag = objectives.preference_diagnostics(torch.softmax(logits, 1), -errors.detach(), labels)
            return rows.sum() / n_images, _as_floats(diag)
        with torch.no_grad():
            ema_prediction = self.trained.route(predict, banks, ema=True).reshape(shape)
        terms = objectives.agsm_rows(
            prediction,
            ema_prediction,
            target[images][:, None],
            labels,
            a.gamma_pos,
            a.gamma_neg,
            a.temperature,
            a.preference,
        )
        loss = objectives.agsm_loss_from_rows(terms, n_images, n_images * (group - 1), a.gamma_neg)
        return loss, _as_floats(objectives.preference_diagnostics(terms.weights, terms.rewards, labels))

    # -- optimiser step -------------------------------------------------------------------------------------------
    def _optimizer_step(self, step: int) -> dict:
        a = self.args
        totals: dict[str, float] = {}
        for micro in range(a.gradient_accumulation_steps):
            for key, value in self._micro_step(step, micro).items():
                totals[key] = totals.get(key, 0.0) + value / a.gradient_accumulation_steps
        params = self.trained.parameters()
        average_gradients(self.accelerator, params)
        loss = torch.tensor(totals["loss"], device=self.backbone.device)
        loss = float(self.accelerator.reduce(loss, reduction="mean"))
        totals["loss"] = loss
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            if a.on_nonfinite_loss == "stop":
                raise FloatingPointError(
                    f"Non-finite loss ({loss}) at step {step}; stopping (set on_nonfinite_loss='skip' to skip such steps)."
                )
            self.state.skipped_steps += 1
            totals["skipped"] = 1.0
            return totals
        if a.max_grad_norm is not None:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.alignment_term().after_optimizer_step()
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        return totals

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> TrainerState:
        """Run (or resume, with `args.resume_from_checkpoint`) the training loop up to `args.max_steps` optimiser steps.

        Returns:
            [`TrainerState`]: `global_step`, `log_history` (one record per `logging_steps`) and `skipped_steps`.
        """
        from tqdm.auto import tqdm

        a = self.args
        with RunLock(self.output_dir, enabled=self.accelerator.is_main_process):
            if self.data is None:
                self.prepare_data()
            checkpoint = resolve_checkpoint(self.output_dir, a.resume_from_checkpoint)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint)
            if self.accelerator.is_main_process:
                save_run_config(a, self.output_dir / RUN_CONFIG_NAME)
                self._print_start()
            start_trackers(self.accelerator, "softalign", a.to_dict())
            progress = tqdm(
                total=a.max_steps,
                initial=self.state.global_step,
                disable=not self.accelerator.is_local_main_process,
                desc=f"softalign {a.objective}",
                dynamic_ncols=True,
            )
            start = time.time()
            self.should_stop = False
            while self.state.global_step < a.max_steps and not self.should_stop:
                logs = self._optimizer_step(self.state.global_step)
                self.state.global_step += 1
                step = self.state.global_step
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", win=f"{logs.get('win_rate', 0):.2f}")
                record = {"step": step, "wall_seconds": round(time.time() - start, 3), **logs}
                if step % a.logging_steps == 0 or step == a.max_steps:
                    self.state.log_history.append(record)
                    log_to_trackers(self.accelerator, logs, step)
                if a.sample_steps and step % a.sample_steps == 0 and a.sample_prompts:
                    self.save_samples(step)
                if (a.save_steps and step % a.save_steps == 0) or step == a.max_steps:
                    self.save_checkpoint()
                self._callback("on_step_end", record)  # may set trainer.should_stop
            progress.close()
            finish_trackers(self.accelerator)
            self._callback("on_train_end")
        return self.state

    def _print_start(self) -> None:
        stats = self.data.stats
        print(
            f"softalign {self.args.objective} on {self.backbone.family}: {json.dumps(self.batch_summary())}; "
            f"cache: {stats.images_encoded} images and {stats.captions_encoded} captions encoded, "
            f"{stats.images_reused} images reused, {len(stats.skipped)} skipped",
            flush=True,
        )

    def _callback(self, event: str, *payload) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self, *payload)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-<step>` (atomic, with an integrity record); keeps `save_total_limit` of them."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None

        def write(folder: Path):
            state = {
                "global_step": self.state.global_step,
                "log_history": self.state.log_history,
                "skipped_steps": self.state.skipped_steps,
                "config": self.args.to_dict(),
            }
            write_training_files(folder, self.trained, self._optimizers(), state)

        path = save_checkpoint(self.output_dir, self.state.global_step, write, self.args.save_total_limit)
        self._callback("on_save", path)
        return path

    def _optimizers(self) -> dict:
        return {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler}

    def _load_checkpoint(self, path: Path) -> None:
        state = read_training_files(path, self.trained, self._optimizers())
        self.state = TrainerState(state["global_step"], state["log_history"], state.get("skipped_steps", 0))

    # -- outputs --------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the trained adapter(s) and the run config: `adapter/` (soft tokens, psi+ and psi-), `lora/<name>/`."""
        return save_trained(
            self.accelerator, self.trained, output_dir, self.output_dir, config=self.args, config_name=RUN_CONFIG_NAME
        )

    @torch.no_grad()
    def save_samples(self, step: int) -> Path | None:
        """Generate the sample prompts with the current psi+ parameters and save a PNG grid."""
        if not self.accelerator.is_main_process:
            return None
        from .eval.report import save_grid

        generator = torch.Generator().manual_seed(self.args.seed)
        images = self.pipe(list(self.args.sample_prompts), generator=generator, num_inference_steps=20).images
        path = self.output_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, list(self.args.sample_prompts), path, columns=min(4, len(images)))
        return path


def _as_floats(diagnostics) -> dict:
    return {k: float(v) for k, v in vars(diagnostics).items()}
