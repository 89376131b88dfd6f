"""The trainers of [`softalign.rl.trl`]: trl 0.23.1's `DDPOTrainer` / `AlignPropTrainer` with defects 1, 2 and 5
fixed and an optional loss trained "alongside" their own (import them from `softalign.rl.trl`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    from trl import AlignPropTrainer, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401 (for trl.py)
except ImportError as error:  # trl >= 0.24 has no diffusion trainers
    raise ImportError(
        f"softalign.rl.trl needs trl==0.23.1 (the last release with DDPOTrainer and AlignPropTrainer): {error}. "
        "Install it with `pip install 'softalign[trl]'`."
    ) from error
from accelerate import PartialState
from accelerate.tracking import GeneralTracker


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


class _SoftAlignTrainerMixin:
    """Defect fixes and the "alongside" loss for trl's `DDPOTrainer` and `AlignPropTrainer`.

    Overrides, of trl 0.23.1:
    - `calculate_loss`: the one method both trainers call inside `accelerator.accumulate(...)` right before
      `accelerator.backward(loss)`; adding the extra term to its first output puts it in the same backward, on the
      same parameters, before trl's gradient clipping and optimizer step. Everything else is left to trl.
    - `_save_pretrained` (defect 2) and a new `save_model`.
    """

    def __init__(
        self,
        *args,
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
        if alongside_every not in ALONGSIDE_EVERY:
            raise ValueError(f"alongside_every must be one of {ALONGSIDE_EVERY}, got {alongside_every!r}.")
        super().__init__(*args, **kwargs)
        self.alongside_loss_fn = alongside_loss_fn
        self.alongside_weight = float(alongside_weight)
        self.alongside_every = alongside_every
        self.last_alongside_loss: float | None = None
        self._patch_image_samples_hook()

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

    def calculate_loss(self, *args, **kwargs):
        """trl's loss plus `alongside_weight * alongside_loss_fn()`.

        With `alongside_every="optimizer_step"` (default) the term is evaluated once per optimizer step, on the
        micro-step that syncs gradients, and scaled by the accumulation steps, so that after accelerate divides every
        micro-step's loss by them its gradient is exactly `weight * grad(alongside_loss_fn())` per optimizer step.
        `"micro_step"` evaluates it at every micro-step (DDPO: every trained timestep), averaging as many draws of a
        stochastic term at as many times the cost.
        """
        output = super().calculate_loss(*args, **kwargs)
        if self.alongside_loss_fn is None or self.alongside_weight == 0.0:
            return output
        scale = 1.0
        if self.alongside_every == "optimizer_step":
            if not self.accelerator.sync_gradients:
                return output
            scale = float(self.accelerator.gradient_accumulation_steps)
        extra = self.alongside_loss_fn()
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
        alongside_loss_fn (`Callable[[], torch.Tensor]`, *optional*): a scalar loss on the same parameters (e.g.
            softalign's AGSM term on an image-caption batch), added to each train step's DDPO loss.
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
