"""`DDPOTrainer`: DDPO (arXiv 2305.13301) on soft tokens and/or a LoRA, for SD1.x/2.x, SDXL (DDIM with log-probs)
and the flow models SD3, SD3.5 and FLUX.1 (the Flow-GRPO SDE, arXiv 2505.05470, on the schedule each pipeline sets:
FLUX.1's resolution-shifted sigmas), with trl 0.23.1's contracts:
`reward_fn(images, prompts, metadata) -> (rewards, info)` and `prompt_fn() -> (prompt, metadata)`.

Each epoch: (1) sample trajectories with the current parameters, keeping every step's latent and log-probability;
(2) score the images; rewards -> advantages (per prompt or globally normalised); (3) PPO: for each trained timestep,
re-score the stored step under the current parameters, `loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`,
plus, with `kl_coef > 0`, `kl_coef * KL(pi_theta || pi_ref)` of that step in closed form (Flow-GRPO's beta term;
the reference is the trained parameters as they were when training began, swapped in for one extra forward).
An optional SoftAlign term (AGSM / SoftREPA on image-caption pairs) is added on the same parameters at every
optimiser step ("alongside"). Randomness is a function of (seed, epoch, batch, process), so a resumed run repeats
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..checkpointing import enable_gradient_checkpointing
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
    write_training_files,
)
from .ddpo_config import DDPOConfig
from .samplers import (
    ddim_step_mean_std,
    ddim_step_with_logprob,
    flow_sde_step_mean_std,
    flow_sde_step_with_logprob,
    gaussian_kl,
)
from .stat_tracking import PerPromptStatTracker

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

RUN_CONFIG_NAME = "ddpo_config.json"


class DDPOTrainer:
    """DDPO on the parameters a SoftAlign stage trains.

    Args:
        config ([`DDPOConfig`]).
        reward_function (`callable`): `(images (B, 3, H, W) in [0, 1], prompts, metadata) -> (rewards (B,), info)`.
        prompt_function (`callable`): `() -> (prompt, metadata)`.
        pipeline: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline`.
        soft_tokens ([`SoftTokens`], *optional*): trained through their bank 0 (psi+), e.g. from a SoftAlign stage.
        peft_config (`peft.LoraConfig`, *optional*): also (or only) train a LoRA adapter `softalign`.
        alongside ([`SoftAlignTrainer`] or [`AlignmentTerm`], *optional*): built on the same pipeline and tokens; its
            objective is added with weight `config.alongside_weight` at every optimiser step, its EMA follows each
            step, and its tensors are checkpointed with the run.
        image_samples_hook (`callable`, *optional*): `(prompts, images, epoch)` after each sampling phase; works
            without any tracker.
    """

    def __init__(
        self,
        config: DDPOConfig,
        reward_function: Callable,
        prompt_function: Callable,
        pipeline: DiffusionPipeline,
        soft_tokens: SoftTokens | None = None,
        peft_config: LoraConfig | None = None,
        alongside: SoftAlignTrainer | AlignmentTerm | None = None,
        image_samples_hook: Callable | None = None,
        accelerator=None,
    ):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        self.args = self.config = config  # `config`, as trl's DDPOTrainer calls it
        self.reward_function, self.prompt_function = reward_function, prompt_function
        self.pipe = pipeline
        self.backbone = backbone_for(pipeline)
        self.accelerator = accelerator or make_accelerator(config.mixed_precision, config.output_dir, config.log_with)
        if soft_tokens is None and peft_config is None:
            raise ValueError("DDPOTrainer needs parameters to train: soft_tokens and/or peft_config.")
        freeze(pipeline)
        if config.gradient_checkpointing:  # the denoiser's own mechanism; soft-token hooks see positional calls too
            enable_gradient_checkpointing(self.backbone.denoiser)
        self.trained = TrainedParameters(pipeline, soft_tokens, peft_config, two_banks=False, ema=False)
        self.soft_tokens = soft_tokens
        self.alongside = as_alignment_term(alongside)
        if config.alongside_weight > 0 and alongside is None:
            raise ValueError("alongside_weight > 0 needs an `alongside` SoftAlignTrainer.")
        self.flow = self.backbone.flow
        scheduler_class = FlowMatchEulerDiscreteScheduler if self.flow else DDIMScheduler
        self.scheduler = scheduler_class.from_config(pipeline.scheduler.config)  # the user's pipeline is untouched
        self.optimizer = torch.optim.AdamW(
            self.trained.parameters(),
            lr=config.train_learning_rate,
            betas=(config.train_adam_beta1, config.train_adam_beta2),
            weight_decay=config.train_adam_weight_decay,
            eps=config.train_adam_epsilon,
        )
        # the KL penalty's reference policy: a copy of the trained parameters before any update (checkpointed)
        self.reference = [p.detach().clone() for p in self.trained.parameters()] if config.kl_coef > 0 else None
        self.stat_tracker = PerPromptStatTracker(
            config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count
        )
        self.image_samples_hook = image_samples_hook
        self.state = TrainerState()
        self.output_dir = Path(config.output_dir)
        self.executor = ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self._negative = None  # encoded negative prompt, (1, ...) per conditioning tensor

    # -- the shared trainer surface -------------------------------------------------------------------------------
    @property
    def trainable(self) -> TrainedParameters:
        """Deprecated alias of `trained` (removed in the next release)."""
        warnings.warn("DDPOTrainer.trainable is deprecated; use .trained.", DeprecationWarning, stacklevel=2)
        return self.trained

    @property
    def epoch(self) -> int:
        """Completed epochs (`state.epoch`)."""
        return self.state.epoch

    @property
    def global_step(self) -> int:
        """Optimiser steps taken (`state.global_step`)."""
        return self.state.global_step

    @property
    def log_history(self) -> list[dict]:
        """One record per epoch (`state.log_history`)."""
        return self.state.log_history

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the trained parameters: soft tokens to `output_dir` (default `<output_dir>/adapter`) in the adapter
        format, the LoRA (when trained) to `<its parent>/lora/softalign/`; load them with `load_soft_tokens` and
        `load_lora`. The run config is saved beside them."""
        return save_trained(
            self.accelerator, self.trained, output_dir, self.output_dir, config=self.config, config_name=RUN_CONFIG_NAME
        )

    # -- randomness ---------------------------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        value = self.config.seed
        for part in (*parts, self.accelerator.process_index):
            value = (value * 1_000_003 + part) % (2**63)
        return value

    # -- sampling -----------------------------------------------------------------------------------------------
    def _conditioning(self, prompts) -> dict:
        cond = self.backbone.encode_prompts(list(prompts))
        if self._negative is None:  # the negative prompt never changes: encode it once per run
            self._negative = self.backbone.encode_prompts([self.config.negative_prompts])
        uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in self._negative.items()}
        return {"cond": cond, "uncond": uncond}

    def _predict(self, latents, timesteps, conditioning, guidance: bool):
        if not guidance:  # under autocast like the guided path, so mixed precision means the same on both
            with self.accelerator.autocast():
                return self.backbone.predict(latents, timesteps, conditioning["cond"]).float()
        both = {k: torch.cat([conditioning["uncond"][k], conditioning["cond"][k]]) for k in conditioning["cond"]}
        steps = timesteps.reshape(-1).expand(latents.shape[0]) if timesteps.numel() == 1 else timesteps
        with self.accelerator.autocast():
            out = self.backbone.predict(torch.cat([latents, latents]), torch.cat([steps, steps]), both).float()
        uncond, cond = out.chunk(2)
        return uncond + self.config.sample_guidance_scale * (cond - uncond)

    def _step(self, output, step_index, timesteps, latents, prev=None, generator=None):
        if self.flow:
            return flow_sde_step_with_logprob(
                self.scheduler, output, step_index, latents, self.config.flow_noise_level, prev, generator
            )
        return ddim_step_with_logprob(
            self.scheduler, output, timesteps, latents, self.config.sample_eta, prev, generator
        )

    def _step_mean_std(self, output, step_index, timesteps, latents):
        if self.flow:
            return flow_sde_step_mean_std(self.scheduler, output, step_index, latents, self.config.flow_noise_level)
        return ddim_step_mean_std(self.scheduler, output, timesteps, latents, self.config.sample_eta)

    @contextmanager
    def _reference_parameters(self):
        """The trained parameters temporarily hold the reference values (restored bit for bit on exit)."""
        params = self.trained.parameters()
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ref in zip(params, self.reference, strict=True):
                p.copy_(ref)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, current, strict=True):
                    p.copy_(value)

    @torch.no_grad()
    def _sample_batch(self, epoch: int, batch: int) -> dict:
        c = self.config
        seed = self._seed(epoch, batch)
        random.seed(seed)  # prompt_fn draws from the global generators; pin them for an exact resume
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        prompts, metadata = zip(*[self.prompt_function() for _ in range(c.sample_batch_size)], strict=True)
        conditioning = self._conditioning(prompts)
        side = c.resolution or image_side(self.pipe)
        shape = self.backbone.latent_shape(c.sample_batch_size, side)  # (B, C, h, w), or packed (B, L, C) for FLUX.1
        generator = torch.Generator().manual_seed(seed)
        device = self.backbone.device
        latents = torch.randn(shape, generator=generator).to(device) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.backbone.set_sampling_timesteps(self.scheduler, c.sample_num_steps, device, latents)
        all_latents, all_log_probs = [latents], []
        for index, t in enumerate(self.scheduler.timesteps):
            output = self._predict(latents, t.reshape(1), conditioning, guidance=c.sample_guidance_scale > 1)
            latents, log_prob = self._step(output, index, t, latents, generator=generator)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        images = self._decode(latents)
        return {
            "prompts": list(prompts),
            "metadata": list(metadata),
            "conditioning": conditioning,
            "images": images,
            "latents": torch.stack(all_latents, dim=1),  # (B, steps + 1, C, h, w); FLUX.1: (B, steps + 1, L, C)
            "log_probs": torch.stack(all_log_probs, dim=1),  # (B, steps)
            "timesteps": self.scheduler.timesteps.repeat(c.sample_batch_size, 1),  # (B, steps)
        }

    def _decode(self, latents):
        return self.backbone.decode(latents)

    def _rewards(self, samples: dict):
        def score():
            result = self.reward_function(samples["images"], tuple(samples["prompts"]), tuple(samples["metadata"]))
            if not isinstance(result, tuple) or len(result) != 2:
                length = f" of length {len(result)}" if isinstance(result, tuple) else ""
                raise ValueError(f"reward_fn must return a (rewards, info) tuple, got {type(result).__name__}{length}.")
            rewards, info = result
            try:
                rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().reshape(-1)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"reward_fn returned rewards of type {type(rewards).__name__}; expected a tensor or sequence of "
                    f"{len(samples['prompts'])} numbers ({error})."
                ) from error
            if rewards.numel() != len(samples["prompts"]):
                raise ValueError(f"reward_fn returned {rewards.numel()} rewards for {len(samples['prompts'])} images.")
            if not torch.isfinite(rewards).all():
                raise ValueError(f"reward_fn returned non-finite rewards: {rewards.tolist()}.")
            return rewards, info

        return self.executor.submit(score) if self.executor else score()

    # -- training -----------------------------------------------------------------------------------------------
    def _advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from accelerate.utils import gather_object

        all_rewards = self.accelerator.gather(rewards.to(self.backbone.device)).cpu()
        all_prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        if self.config.per_prompt_stat_tracking:
            advantages = torch.as_tensor(
                self.stat_tracker.update(all_prompts, all_rewards.numpy()), dtype=torch.float32
            )
        else:
            advantages = (all_rewards - all_rewards.mean()) / (all_rewards.std(unbiased=False) + 1e-8)
        rank, n = self.accelerator.process_index, rewards.numel()
        return advantages[rank * n : (rank + 1) * n]

    def _ppo_loss(self, batch, j: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        rows = torch.arange(batch["latents"].shape[0])
        index = batch["perms"][:, j]
        latents, prev = batch["latents"][rows, index], batch["latents"][rows, index + 1]
        timesteps = batch["timesteps"][rows, index]
        if c.kl_coef > 0:  # before the trained forward, so no tensor autograd saved is touched by the swap
            with torch.no_grad(), self._reference_parameters():
                reference = self._predict(latents, timesteps, batch["conditioning"], guidance=c.train_cfg)
        output = self._predict(latents, timesteps, batch["conditioning"], guidance=c.train_cfg)
        _, log_prob = self._step(output, index, timesteps, latents, prev=prev)
        advantages = batch["advantages"].clamp(-c.train_adv_clip_max, c.train_adv_clip_max).to(log_prob.device)
        ratio = torch.exp(log_prob - batch["log_probs"][rows, index])
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - c.train_clip_range, 1 + c.train_clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        info = {
            "approx_kl": 0.5 * ((log_prob - batch["log_probs"][rows, index]) ** 2).mean().item(),
            "clipfrac": ((ratio - 1).abs() > c.train_clip_range).float().mean().item(),
        }
        if c.kl_coef > 0:
            mean, std = self._step_mean_std(output, index, timesteps, latents)
            reference_mean, _ = self._step_mean_std(reference, index, timesteps, latents)
            kl = gaussian_kl(mean, reference_mean, std).mean()
            loss = loss + c.kl_coef * kl
            info["kl"] = kl.item()
        return loss, info

    def _train_epoch(self, samples: list[dict], epoch: int) -> dict:
        c = self.config
        merged = _merge(samples)
        total = merged["latents"].shape[0]
        params = self.trained.parameters()
        accumulation = c.train_gradient_accumulation_steps * c.num_train_timesteps
        logs, micro = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, **({"kl": 0.0} if c.kl_coef > 0 else {})}, 0
        for inner in range(c.train_num_inner_epochs):
            generator = torch.Generator().manual_seed(self._seed(epoch, 10_000 + inner))
            order = torch.randperm(total, generator=generator)
            perms = torch.stack([torch.randperm(c.sample_num_steps, generator=generator) for _ in range(total)])
            for start in range(0, total, c.train_batch_size):
                rows = order[start : start + c.train_batch_size]
                batch = {
                    k: (v[rows] if isinstance(v, torch.Tensor) else v)
                    for k, v in merged.items()
                    if k not in ("conditioning", "prompts", "metadata", "images")
                }
                batch["conditioning"] = {
                    side: {k: v[rows] for k, v in cond.items()} for side, cond in merged["conditioning"].items()
                }
                batch["perms"] = perms[rows]
                for j in range(c.num_train_timesteps):
                    loss, info = self._ppo_loss(batch, j)
                    if not torch.isfinite(loss):
                        self.optimizer.zero_grad(set_to_none=True)
                        raise FloatingPointError(
                            f"Non-finite DDPO loss ({loss.item()}) at epoch {epoch}, timestep {j}; stopping before "
                            "it reaches the parameters."
                        )
                    self.accelerator.backward(loss / accumulation)
                    logs["loss"] += loss.item()
                    for key, value in info.items():
                        logs[key] += value
                    micro += 1
                    if micro % accumulation == 0:
                        self._optimizer_step(params)
        return {k: v / max(micro, 1) for k, v in logs.items()}

    def _optimizer_step(self, params) -> None:
        if self.alongside is not None and self.config.alongside_weight > 0:
            self.alongside.backward(self.global_step, self.config.alongside_weight)
        average_gradients(self.accelerator, params)
        torch.nn.utils.clip_grad_norm_(params, self.config.train_max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.alongside is not None:
            self.alongside.after_optimizer_step()
        self.state.global_step += 1

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self, epochs: int | None = None) -> TrainerState:
        """Run (or resume, with `config.resume_from`) `epochs` (default `config.num_epochs`) epochs of sampling and
        training.

        Returns:
            [`TrainerState`]: `epoch`, `global_step` and `log_history` (one record per epoch).
        """
        from tqdm.auto import tqdm

        c = self.config
        with RunLock(self.output_dir, enabled=self.accelerator.is_main_process):
            checkpoint = resolve_checkpoint(self.output_dir, c.resume_from)
            if checkpoint is not None:
                self._load_checkpoint(checkpoint)
            if self.alongside is not None:
                self.alongside.prepare()
            if self.accelerator.is_main_process:
                save_run_config(c, self.output_dir / RUN_CONFIG_NAME)
            start_trackers(self.accelerator, "softalign-ddpo", c.to_dict())
            last = epochs if epochs is not None else c.num_epochs
            bar = tqdm(range(self.epoch, last), desc="ddpo", disable=not self.accelerator.is_local_main_process)
            for epoch in bar:
                started = time.time()
                samples = [self._sample_batch(epoch, b) for b in range(c.sample_num_batches_per_epoch)]
                scored = [self._rewards(s) for s in samples]
                if self.executor:
                    scored = [future.result() for future in scored]
                for sample, (rewards, _) in zip(samples, scored, strict=True):
                    sample["rewards"] = rewards
                rewards = torch.cat([s["rewards"] for s in samples])
                prompts = [p for s in samples for p in s["prompts"]]
                advantages = self._advantages(rewards, prompts)
                for sample, chunk in zip(samples, advantages.split(c.sample_batch_size), strict=True):
                    sample["advantages"] = chunk
                if self.image_samples_hook is not None:
                    self.image_samples_hook(prompts, torch.cat([s["images"] for s in samples]), epoch)
                logs = self._train_epoch(samples, epoch)
                record = {
                    "epoch": epoch,
                    "reward_mean": rewards.mean().item(),
                    "reward_std": rewards.std().item(),
                    "wall_seconds": round(time.time() - started, 3),
                    **logs,
                }
                self.state.log_history.append(record)
                log_to_trackers(self.accelerator, record, epoch)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{logs['approx_kl']:.2e}")
                self.state.epoch = epoch + 1
                if self.epoch % c.save_freq == 0 or self.epoch == last:
                    self.save_checkpoint()
            finish_trackers(self.accelerator)
        return self.state

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-<epoch>` (atomic, with an integrity record); keeps `num_checkpoint_limit` of them."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        from safetensors.torch import save_file

        def write(folder: Path):
            state = {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "log_history": self.log_history,
                "stat_tracker": self.stat_tracker.state_dict(),
                "config": self.config.to_dict(),
            }
            write_training_files(folder, self.trained, {"optimizer": self.optimizer}, state)
            if self.reference is not None:
                save_file({str(i): ref for i, ref in enumerate(self.reference)}, str(folder / "reference.safetensors"))
            if self.alongside is not None:
                save_file(self.alongside.state_dict(), str(folder / "alongside.safetensors"))

        return save_checkpoint(self.output_dir, self.epoch, write, self.config.num_checkpoint_limit)

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = read_training_files(path, self.trained, {"optimizer": self.optimizer})
        if self.reference is not None:
            if not (path / "reference.safetensors").is_file():
                raise ValueError(
                    f"{path} has no reference.safetensors: it was written with kl_coef = 0, so the KL penalty's "
                    "reference (the parameters before training) is unknown; resume with kl_coef = 0 or start afresh."
                )
            saved = load_file(str(path / "reference.safetensors"))
            self.reference = [saved[str(i)] for i in range(len(self.reference))]
        if self.alongside is not None and (path / "alongside.safetensors").is_file():
            self.alongside.load_state_dict(load_file(str(path / "alongside.safetensors")))
        self.state = TrainerState(state["global_step"], state["log_history"], epoch=state["epoch"])
        self.stat_tracker.load_state_dict(state["stat_tracker"])


def _merge(samples: list[dict]) -> dict:
    merged = {k: torch.cat([s[k] for s in samples]) for k in ("latents", "log_probs", "timesteps", "advantages")}
    merged["conditioning"] = {
        side: {k: torch.cat([s["conditioning"][side][k] for s in samples]) for k in samples[0]["conditioning"][side]}
        for side in ("cond", "uncond")
    }
    merged["prompts"] = [p for s in samples for p in s["prompts"]]
    return merged
