"""Soft tokens (and/or a LoRA) in an existing trl 0.23.1 `DDPOTrainer` / `AlignPropTrainer` set-up.

trl 0.23.1 is the last release with diffusion trainers. Its trainers run the UNet themselves, in sampling (under
`no_grad`), in the DDPO loss and in AlignProp's differentiable sampler, so the only place where soft tokens stay the
same in all three is inside the UNet call: [`SoftTokenDDPOStableDiffusionPipeline`] attaches them with softalign's
forward pre-hooks (appending them to `prompt_embeds` outside the UNet would give stale tokens in DDPO and no gradient
in AlignProp, which encodes prompts under `no_grad`).

Known defects of trl 0.23.1 this module works around (the numbers of `ENVIRONMENT.md`):

1. constructing a trl pipeline or trainer without an accelerate state raises `RuntimeError`: the pipeline and the
   trainers here create `accelerate.PartialState()` first;
2. `DDPOTrainer.save_pretrained` raises `AttributeError` (`_save_pretrained` calls `create_model_card`, which reads
   `transformers.Trainer` attributes) and there is no `save_model`: the trainers override `_save_pretrained`, add
   `save_model`, and the pipeline's `save_pretrained` writes adapters only;
3. resuming a LoRA run loads the checkpoint into a second adapter `default_1` (diffusers' `load_lora_into_unet` picks
   a fresh adapter name) that the optimizer does not hold: `load_checkpoint` here copies the saved tensors into the
   parameters the optimizer holds;
5. `image_samples_hook` without a tracker raises `IndexError` (`self.accelerator.trackers[0]`): the trainers give the
   hook `None` as the tracker then;
7. `get_trainable_layers()` must return one `nn.Module`: it returns a [`TrainableLayers`] holding exactly the
   trained parameters.

Not fixed here: 4 (with several processes the gradients are never all-reduced, because trl runs forward/backward on
the unwrapped UNet) and 6 (SD1.x/2.x only, DDIM forced): the pipeline refuses other pipeline classes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

try:
    from trl import AlignPropTrainer, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
except ImportError as error:  # trl >= 0.24 has no diffusion trainers
    raise ImportError(
        f"softalign.rl.trl needs trl==0.23.1 (the last release with DDPOTrainer and AlignPropTrainer): {error}. "
        "Install it with `pip install 'softalign[trl]'`."
    ) from error
from accelerate import PartialState
from accelerate.tracking import GeneralTracker

from ..atomic import atomic_directory
from ..families import base_model_record
from ..injection import attach_soft_tokens, check_compatible, injection_of
from ..loaders import lora_config
from ..soft_tokens import SoftTokens
from ..softalign_trainer import AlignmentTerm, SoftAlignTrainer, as_alignment_term

SOFT_TOKENS_DIR = "soft_tokens"  # softalign adapter format (`load_soft_tokens(pipe, dir / SOFT_TOKENS_DIR)`)
LORA_DIR = "unet_lora"  # PEFT format: adapter_config.json + adapter_model.safetensors
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # the name trl and diffusers give a single trained adapter
STATE_FILE = "softalign_trl_state.json"  # epoch and alongside step of a checkpoint (trl records neither)
ALONGSIDE_FILE = "alongside.safetensors"  # the alongside term's tensors (AGSM: with its EMA tokens)


def ensure_accelerate_state() -> None:
    """Defect 1: trl's `accelerate.logging` calls fail before any accelerate state exists.

    `PartialState()` is a shared singleton; creating it is idempotent and is what `Accelerator()` would do first.
    """
    PartialState()


class _NoTracker(GeneralTracker):
    """Stands in for `accelerator.trackers[0]` when there is no tracker, so trl's image hook call cannot fail."""

    name = "softalign_no_tracker"
    requires_logging_directory = False
    main_process_only = False

    @property
    def tracker(self):
        return None


ALONGSIDE_EVERY = ("optimizer_step", "micro_step")


class _RandomStateProblems(logging.Handler):
    """Collects accelerate's "Could not load random states" (an INFO line, easy to miss) while a checkpoint loads."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if "could not load random states" in record.getMessage().lower():
            self.failed = True


class _SoftAlignTrainerMixin:
    """Defect fixes and the "alongside" term for trl's `DDPOTrainer` and `AlignPropTrainer`.

    Overrides, of trl 0.23.1:
    - `calculate_loss`: the one method both trainers call inside `accelerator.accumulate(...)` right before
      `accelerator.backward(loss)`; adding the extra term to its first output puts it in the same backward, on the
      same parameters, before trl's gradient clipping and optimizer step. Everything else is left to trl.
    - the optimizer's `step`: after each real step the alongside term's `after_optimizer_step()` runs (AGSM's EMA).
    - the save/load hooks: a checkpoint also holds the epoch it was written at, the alongside step and the alongside
      term's tensors; a resumed run starts at the next epoch (trl 0.23.1 takes the first epoch from the checkpoint's
      number, so with `save_freq=1` it would repeat epoch 1) and warns when accelerate could not restore the RNG state.
    - `_save_pretrained` (defect 2) and a new `save_model`.
    """

    def __init__(
        self,
        *args,
        alongside: SoftAlignTrainer | AlignmentTerm | None = None,
        alongside_loss_fn: Callable[[], torch.Tensor] | None = None,
        alongside_weight: float = 1.0,
        alongside_every: str = "optimizer_step",
        **kwargs,
    ):
        ensure_accelerate_state()
        if alongside_loss_fn is not None and not callable(alongside_loss_fn):
            raise TypeError(
                f"alongside_loss_fn must be a callable returning a scalar tensor, got {alongside_loss_fn!r}."
            )
        if alongside is not None and alongside_loss_fn is not None:
            raise ValueError("Pass alongside (a SoftAlignTrainer or its AlignmentTerm) or alongside_loss_fn, not both.")
        if alongside_every not in ALONGSIDE_EVERY:
            raise ValueError(f"alongside_every must be one of {ALONGSIDE_EVERY}, got {alongside_every!r}.")
        # set before trl's constructor: it loads a checkpoint (our hooks need these) when resuming
        self.alongside = as_alignment_term(alongside)
        self.alongside_loss_fn = alongside_loss_fn
        self.alongside_weight = float(alongside_weight)
        self.alongside_every = alongside_every
        self.alongside_step = 0
        self.last_alongside_loss: float | None = None
        self._epoch = 0
        self._resumed_epoch: int | None = None
        if self.alongside is not None:
            self.alongside.prepare()
        problems = _RandomStateProblems()
        accelerate_logger = logging.getLogger("accelerate.checkpointing")
        accelerate_logger.addHandler(problems)
        level = accelerate_logger.level
        accelerate_logger.setLevel(logging.INFO)
        try:
            super().__init__(*args, **kwargs)
        except pickle.UnpicklingError:
            raise ValueError(
                f"Refused to resume from {self.config.resume_from}: a file of the checkpoint holds objects that "
                "torch.load(weights_only=True) does not allow. softalign never unpickles arbitrary objects; resume "
                "from a checkpoint this trainer wrote, or start afresh."
            ) from None
        finally:
            accelerate_logger.removeHandler(problems)
            accelerate_logger.setLevel(level)
        if self.config.resume_from:
            self._fix_first_epoch()
            if problems.failed:
                warnings.warn(
                    f"Could not restore the random state of {self.config.resume_from} (accelerate refused or could "
                    "not read random_states_*.pkl): the resumed run draws different samples than an uninterrupted "
                    "one would.",
                    stacklevel=3,
                )
        self._wrap_optimizer_step()
        self._patch_image_samples_hook()

    def _fix_first_epoch(self) -> None:
        if self._resumed_epoch is not None:
            self.first_epoch = self._resumed_epoch + 1
            return
        # a checkpoint trl wrote alone: checkpoint_k is the (k + 1)-th save, written after epoch (k + 1) * save_freq
        number = int(os.path.basename(os.path.normpath(self.config.resume_from)).split("_")[-1])
        self.first_epoch = (number + 1) * self.config.save_freq + 1

    def _wrap_optimizer_step(self) -> None:
        step = self.optimizer.step

        def step_then_alongside(*args, **kwargs):
            result = step(*args, **kwargs)
            if self.accelerator.sync_gradients and self.alongside is not None:  # a real step, not an accumulation
                self.alongside.after_optimizer_step()
            return result

        self.optimizer.step = step_then_alongside

    def step(self, epoch: int, global_step: int):
        """trl's epoch (sampling and training), remembering the epoch for the checkpoint it may write."""
        self._epoch = epoch
        return super().step(epoch, global_step)

    def _save_model_hook(self, models, weights, output_dir):
        super()._save_model_hook(models, weights, output_dir)
        state = {"epoch": self._epoch, "alongside_step": self.alongside_step}
        Path(output_dir, STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
        if self.alongside is not None:
            from safetensors.torch import save_file

            save_file(self.alongside.state_dict(), str(Path(output_dir, ALONGSIDE_FILE)))

    def _load_model_hook(self, models, input_dir):
        super()._load_model_hook(models, input_dir)
        state_file = Path(input_dir, STATE_FILE)
        if state_file.is_file():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            self._resumed_epoch, self.alongside_step = int(state["epoch"]), int(state.get("alongside_step", 0))
        if self.alongside is not None and Path(input_dir, ALONGSIDE_FILE).is_file():
            from safetensors.torch import load_file

            self.alongside.load_state_dict(load_file(str(Path(input_dir, ALONGSIDE_FILE))))

    def _patch_image_samples_hook(self) -> None:
        # Defect 5: trl passes `self.accelerator.trackers[0]`, which does not exist without `log_with` (nor on the
        # non-main processes, where accelerate creates no trackers). A placeholder makes the index valid and the
        # wrapper hands the user's hook `None` in its place.
        hook = self.image_samples_callback
        if hook is None:
            return
        if not self.accelerator.trackers:
            self.accelerator.trackers.append(_NoTracker())

        def image_samples_hook(samples, global_step, tracker):
            return hook(samples, global_step, None if isinstance(tracker, _NoTracker) else tracker)

        self.image_samples_callback = image_samples_hook

    def _alongside_loss(self) -> torch.Tensor | None:
        if self.alongside is not None:
            extra = self.alongside.loss(self.alongside_step)
            self.alongside_step += 1
            return extra
        if self.alongside_loss_fn is not None:
            return self.alongside_loss_fn()
        return None

    def calculate_loss(self, *args, **kwargs):
        """trl's loss plus `alongside_weight` times the alongside term (`alongside.loss(k)` or `alongside_loss_fn()`).

        With `alongside_every="optimizer_step"` (default) the term is evaluated once per optimizer step, on the
        micro-step that syncs gradients, and scaled by the accumulation steps, so that after accelerate divides every
        micro-step's loss by them its gradient is exactly `weight * grad(term)` per optimizer step.
        `"micro_step"` evaluates it at every micro-step (DDPO: every trained timestep), averaging as many draws of a
        stochastic term at as many times the cost.
        """
        output = super().calculate_loss(*args, **kwargs)
        if (self.alongside is None and self.alongside_loss_fn is None) or self.alongside_weight == 0.0:
            return output
        scale = 1.0
        if self.alongside_every == "optimizer_step":
            if not self.accelerator.sync_gradients:
                return output
            scale = float(self.accelerator.gradient_accumulation_steps)
        extra = self._alongside_loss()
        if not isinstance(extra, torch.Tensor) or extra.numel() != 1:
            found = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
            raise ValueError(f"alongside_loss_fn must return a scalar torch.Tensor, got {found}.")
        self.last_alongside_loss = float(extra.detach())
        term = (self.alongside_weight * scale) * extra.reshape(())
        if isinstance(output, tuple):  # DDPO: (loss, approx_kl, clipfrac)
            return (output[0] + term, *output[1:])
        return output + term

    def _save_pretrained(self, save_directory) -> None:
        # Defect 2: trl's version calls `create_model_card`, written for `transformers.Trainer` (AttributeError).
        if self.accelerator.is_main_process:
            self.sd_pipeline.save_pretrained(save_directory)

    def save_model(self, output_dir) -> None:
        """Save the trained adapters to `output_dir` (the same as `save_pretrained`)."""
        self.save_pretrained(output_dir)


class SoftAlignDDPOTrainer(_SoftAlignTrainerMixin, DDPOTrainer):
    """trl 0.23.1's `DDPOTrainer` with an optional extra loss "alongside" DDPO, and defects 1, 2 and 5 fixed.

    Takes trl's arguments `(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)` plus:

    Args:
        alongside ([`SoftAlignTrainer`] or [`AlignmentTerm`], *optional*): softalign's objective (AGSM / SoftREPA on
            an image-caption batch) on the same parameters, added to each train step's DDPO loss, with its EMA
            updated after each optimizer step and its tensors checkpointed: the same contract as softalign's own
            trainers.
        alongside_loss_fn (`Callable[[], torch.Tensor]`, *optional*): instead of `alongside`, any scalar loss on the
            same parameters.
        alongside_weight (`float`, *optional*, defaults to 1.0): its weight lambda (0 switches it off).
        alongside_every (`str`, *optional*, defaults to `"optimizer_step"`): `"optimizer_step"` or `"micro_step"`;
            see [`~_SoftAlignTrainerMixin.calculate_loss`].

    The `image_samples_hook` receives `None` as its tracker when there is none. Use it with a
    [`SoftTokenDDPOStableDiffusionPipeline`] for soft tokens, checkpoints that restore them, and a LoRA resume that
    keeps training.
    """


class SoftAlignAlignPropTrainer(_SoftAlignTrainerMixin, AlignPropTrainer):
    """trl 0.23.1's `AlignPropTrainer` with the same additions as [`SoftAlignDDPOTrainer`].

    AlignProp backpropagates the reward through the sampler but detaches the prediction of every step before
    `truncated_backprop_timestep` (or before a random step in `truncated_rand_backprop_minmax`); with trl's defaults
    (49, or a step in (0, 50)) and few sampling steps, every step may be detached and no gradient reaches the trained
    parameters. Keep that step below `sample_num_steps` (e.g. `truncated_backprop_rand=False`,
    `truncated_backprop_timestep=sample_num_steps - 1`).
    """


def _default_lora_config():
    # trl's `DefaultDDPOStableDiffusionPipeline.get_trainable_layers` uses this adapter.
    return lora_config(4, ("to_k", "to_q", "to_v", "to_out.0"), init_lora_weights="gaussian")


class TrainableLayers(nn.Module):
    """The one module trl trains (defect 7): the trained soft tokens and the LoRA parameters of the UNet.

    It shares its parameters with the pipeline (no copies), so trl's optimizer, gradient clipping and `prepare` act on
    the live tokens and adapter. It has no forward: trl always calls the UNet itself.

    Args:
        soft_tokens ([`SoftTokens`], *optional*): the trained tokens (`None` when they are frozen).
        lora_parameters (`dict[str, nn.Parameter]`): the trained LoRA parameters, keyed by their UNet names.
    """

    def __init__(self, soft_tokens: SoftTokens | None, lora_parameters: dict[str, nn.Parameter]):
        super().__init__()
        self.soft_tokens = soft_tokens
        self.lora = nn.ParameterList(list(lora_parameters.values()))
        self.lora_names = list(lora_parameters)

    def forward(self, *args, **kwargs):
        """Refuses: this module only holds parameters."""
        raise RuntimeError("TrainableLayers only holds the trained parameters; run the pipeline's UNet instead.")


class SoftTokenDDPOStableDiffusionPipeline(DefaultDDPOStableDiffusionPipeline):
    """trl's DDPO/AlignProp pipeline built from an existing `StableDiffusionPipeline`, carrying soft tokens.

    Unlike trl's constructor (which takes a hub id and calls `from_pretrained`), this one takes a loaded pipeline and
    never downloads. It prepares the pipeline as trl does, in place: a DDIM scheduler (trl's sampler needs it), no
    safety checker, the VAE, text encoder and UNet frozen. The trained parameters are the soft tokens (unless
    `train_soft_tokens=False`) and, with `use_lora=True`, a LoRA adapter named `"default"` on the UNet.

    Args:
        sd_pipeline (`diffusers.StableDiffusionPipeline`): an SD1.x/2.x pipeline (trl 0.23.1 supports no other).
        soft_tokens ([`SoftTokens`], *optional*): tokens to attach. Defaults to the tokens the pipeline already
            carries (`load_soft_tokens(pipe, ...)`), if any.
        train_soft_tokens (`bool`, *optional*, defaults to `True`): train the tokens, or keep them as frozen
            conditioning (then `use_lora` must be on).
        use_lora (`bool`, *optional*, defaults to `False`): train a LoRA adapter on the UNet. Implied by `lora_config`.
        lora_config (`peft.LoraConfig`, *optional*): the adapter; defaults to trl's (rank 4 on to_q/k/v/out).

    Example:
        ```py
        >>> from trl import DDPOConfig
        >>> from softalign.rl.trl import SoftAlignDDPOTrainer, SoftTokenDDPOStableDiffusionPipeline
        >>> pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")
        >>> ddpo_pipe = SoftTokenDDPOStableDiffusionPipeline.from_pipeline(pipe, soft_tokens=tokens)
        >>> trainer = SoftAlignDDPOTrainer(DDPOConfig(...), reward_fn, prompt_fn, ddpo_pipe)
        >>> trainer.train()
        >>> trainer.save_pretrained("out")  # out/soft_tokens (softalign adapter), out/unet_lora (PEFT, with LoRA)
        ```
    """

    def __init__(
        self,
        sd_pipeline,
        *,
        soft_tokens: SoftTokens | None = None,
        train_soft_tokens: bool = True,
        use_lora: bool = False,
        lora_config=None,
    ):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        ensure_accelerate_state()
        if isinstance(sd_pipeline, (str, os.PathLike)):
            raise TypeError(
                f"SoftTokenDDPOStableDiffusionPipeline takes a loaded StableDiffusionPipeline, got the path or id "
                f"{str(sd_pipeline)!r}; load it first with `StableDiffusionPipeline.from_pretrained(local_path)`."
            )
        if not isinstance(sd_pipeline, StableDiffusionPipeline):
            raise TypeError(
                f"trl 0.23.1's DDPO/AlignProp sampler supports SD1.x/2.x StableDiffusionPipeline only (SDXL needs "
                f"added_cond_kwargs, SD3 a flow-model sampler), got {type(sd_pipeline).__name__}."
            )
        use_lora = bool(use_lora or lora_config is not None)
        existing = injection_of(sd_pipeline)
        # Validate everything before touching the user's pipeline.
        if soft_tokens is not None and existing is not None and existing.soft_tokens is not soft_tokens:
            raise ValueError(
                "The pipeline already carries other soft tokens; unload them (`unload_soft_tokens(pipe)`) or pass "
                "soft_tokens=None to use them."
            )
        if soft_tokens is not None and existing is None:
            check_compatible(soft_tokens.config, sd_pipeline)
        if soft_tokens is None and existing is None and not use_lora:
            raise ValueError("Nothing to train: pass soft_tokens (or a pipeline carrying them) and/or use_lora=True.")
        if use_lora and getattr(sd_pipeline.unet, "peft_config", None):
            raise ValueError(
                f"The UNet already carries PEFT adapters {sorted(sd_pipeline.unet.peft_config)}; fuse or unload them "
                "first (`pipe.fuse_lora(); pipe.unload_lora_weights()`) so that exactly one adapter is trained."
            )

        # Deliberately no super().__init__(): trl's constructor downloads from the hub.
        self.sd_pipeline = sd_pipeline
        self.pretrained_model = getattr(sd_pipeline, "name_or_path", None)
        self.pretrained_revision = None
        self.use_lora = use_lora
        self.train_soft_tokens = bool(train_soft_tokens)
        sd_pipeline.scheduler = DDIMScheduler.from_config(sd_pipeline.scheduler.config)
        sd_pipeline.safety_checker = None
        for module in (sd_pipeline.vae, sd_pipeline.text_encoder, sd_pipeline.unet):
            module.requires_grad_(False)
        self.injection = existing  # when both are given they are the same tokens (checked above)
        if existing is None and soft_tokens is not None:
            self.injection = attach_soft_tokens(sd_pipeline, soft_tokens)
        if self.injection is not None:
            self.injection.soft_tokens.requires_grad_(self.train_soft_tokens)
        if use_lora:
            sd_pipeline.unet.add_adapter(lora_config or _default_lora_config(), adapter_name=ADAPTER_NAME)

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        soft_tokens: SoftTokens | None = None,
        use_lora: bool = False,
        lora_config=None,
        train_soft_tokens: bool = True,
    ) -> SoftTokenDDPOStableDiffusionPipeline:
        """Wrap a loaded `StableDiffusionPipeline` (see the class docstring for the arguments)."""
        return cls(
            pipe,
            soft_tokens=soft_tokens,
            use_lora=use_lora,
            lora_config=lora_config,
            train_soft_tokens=train_soft_tokens,
        )

    @property
    def soft_tokens(self) -> SoftTokens | None:
        """The soft tokens the pipeline carries (`None` without any)."""
        return None if self.injection is None else self.injection.soft_tokens

    @property
    def autocast(self):
        """trl's autocast context for the UNet calls: none (see the comment below)."""
        # The frozen UNet runs in the trainer's inference dtype; the trained tensors stay float32 and are cast per call
        # (the hooks cast the tokens to the context dtype, PEFT casts LoRA inputs), so no autocast is needed. trl
        # makes the same choice for LoRA.
        return contextlib.nullcontext

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA parameters of the trained adapter, keyed by their UNet names (empty without LoRA)."""
        if not self.use_lora:
            return {}
        marker = f".{ADAPTER_NAME}."
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and marker in n}

    def get_trainable_layers(self) -> TrainableLayers:
        """One module holding the trained parameters (trl calls this after moving the UNet to its device/dtype)."""
        device = self.unet.device
        trained_tokens = self.soft_tokens if self.train_soft_tokens else None
        if self.soft_tokens is not None:
            # The tokens live on the injection, not in the UNet, so the trainer's `unet.to(device)` did not move them.
            self.soft_tokens.to(device=device, dtype=torch.float32)
        lora = self.lora_parameters()
        for param in lora.values():
            param.requires_grad_(True)
            param.data = param.data.to(torch.float32)  # as trl: fp32 masters for fp16/bf16 runs
        if trained_tokens is None and not lora:
            raise ValueError(
                "Nothing to train: the soft tokens are frozen (train_soft_tokens=False) and use_lora is off. "
                "Pass train_soft_tokens=True and/or use_lora=True."
            )
        return TrainableLayers(trained_tokens, lora)

    # -- saving: checkpoints (accelerate hooks) and final adapters ---------------------------------------------
    def save_pretrained(self, output_dir) -> None:
        """Write the adapters (the base model is unchanged): `soft_tokens/` and, with LoRA, `unet_lora/`.

        Load them into a stock pipeline with `load_soft_tokens(pipe, output_dir / "soft_tokens")` and
        `pipe.unet.load_lora_adapter(output_dir / "unet_lora", prefix=None, weight_name="adapter_model.safetensors")`.
        """
        output_dir = Path(output_dir)
        if self.soft_tokens is not None:
            self.soft_tokens.save_pretrained(
                output_dir / SOFT_TOKENS_DIR, base_model=base_model_record(self.sd_pipeline)
            )
        if self.use_lora:
            _save_lora(self.unet, output_dir / LORA_DIR)

    def save_checkpoint(self, models, weights, output_dir) -> None:
        """accelerate's save-state pre-hook (via trl's `_save_model_hook`): the same files as `save_pretrained`."""
        _check_one_model(models)
        self.save_pretrained(output_dir)

    def load_checkpoint(self, models, input_dir) -> None:
        """accelerate's load-state pre-hook: copy the saved tensors into the live parameters.

        Copying in place keeps the parameters the optimizer holds (trl's own hook loads LoRA into a new adapter,
        defect 3, and never restores soft tokens).
        """
        _check_one_model(models)
        input_dir = Path(input_dir)
        if self.soft_tokens is not None:
            saved = SoftTokens.from_pretrained(_required(input_dir / SOFT_TOKENS_DIR, "soft tokens"))
            expected = self.soft_tokens.config.parameter_shapes()
            if saved.config.parameter_shapes() != expected:
                raise ValueError(
                    f"Checkpoint {input_dir} holds soft tokens of shapes {saved.config.parameter_shapes()}, this "
                    f"pipeline's tokens have {expected}."
                )
            with torch.no_grad():
                for name, param in self.soft_tokens.state_dict(keep_vars=True).items():
                    param.copy_(saved.state_dict()[name])
        if self.use_lora:
            _load_lora(self.unet, _required(input_dir / LORA_DIR, "a LoRA adapter"))


def _check_one_model(models) -> None:
    if len(models) != 1:
        raise ValueError(f"Expected the one TrainableLayers module trl prepared, got {len(models)} models.")


def _required(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path.parent} has no {path.name}/, but this run trains {what}.")
    return path


def _save_lora(unet, path: Path) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config[ADAPTER_NAME].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config_json = json.dumps(config, indent=2, sort_keys=True, default=str)
    with atomic_directory(path) as staging:
        (staging / LORA_CONFIG).write_text(config_json + "\n", encoding="utf-8")
        # diffusers' `load_lora_adapter` reads the adapter config from this header key (rank and alpha exactly).
        save_file(tensors, str(staging / LORA_WEIGHTS), metadata={"format": "pt", "lora_adapter_metadata": config_json})


def _load_lora(unet, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / LORA_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA checkpoint {path} is missing {LORA_WEIGHTS}.")
    state = load_file(str(weights))
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as error:  # shape mismatch: a different rank or target set
        raise ValueError(f"LoRA checkpoint {weights} does not fit this UNet's adapter: {error}") from error
    marker = f".{ADAPTER_NAME}."
    missing = [k for k in result.missing_keys if "lora_" in k and marker in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA checkpoint {weights} does not match this UNet's adapter (unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]})."
        )


__all__ = [
    "SoftAlignAlignPropTrainer",
    "SoftAlignDDPOTrainer",
    "SoftTokenDDPOStableDiffusionPipeline",
    "TrainableLayers",
]
