"""`AlignmentTerm`: SoftAlign's objective as a term that another trainer adds to its own step ("alongside").

It is the one public contract between [`SoftAlignTrainer`] and the RL trainers (`DDPOTrainer`, `DiffusionDPOTrainer`,
the TRL adapter) and the step benchmark: the term holds a SoftAlign trainer and reaches its micro-batch, its EMA and
its tensors only through the methods below.
"""

from __future__ import annotations

import torch


class AlignmentTerm:
    """SoftAlign's objective as a term another trainer adds to its own optimiser step ("alongside").

    Every trainer that trains alongside (`DDPOTrainer`, `DiffusionDPOTrainer`, the TRL adapter, the step benchmark)
    uses it the same way, once per optimiser step `k`:

    1. `term.backward(k, weight)` (or `weight * term.loss(k)` added to the trainer's own loss) before the optimiser
       step, on the same parameters;
    2. `term.after_optimizer_step()` after it (AGSM: moves the EMA tokens that score the candidates);
    3. `term.state_dict()` / `term.load_state_dict()` in the trainer's checkpoint (the SoftAlign tensors, EMA
       included), so a resumed run continues exactly.

    Get it from [`SoftAlignTrainer.alignment_term`].
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def prepare(self) -> None:
        """Encode the image-caption data once (a no-op when already done)."""
        if self.trainer.data is None:
            self.trainer.prepare_data()

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained SoftAlign parameters (the same tensors the other trainer trains, where they overlap)."""
        return self.trainer.trained.parameters()

    def loss(self, step: int) -> torch.Tensor:
        """The objective on the micro-batch of `step`, with its graph (no backward). Keeps every chunk's graph:
        prefer [`backward`] where the caller can backpropagate the term on its own."""
        self.prepare()
        losses = [loss for loss, _, _ in self.trainer._chunk_losses(step, 0)]
        return torch.stack(losses).sum()

    def backward(self, step: int, weight: float = 1.0) -> dict:
        """Backpropagate `weight` times the objective on the micro-batch of `step` (chunk by chunk, so memory stays
        bounded); returns its diagnostics (loss, win rate, ...)."""
        self.prepare()
        return self.trainer._micro_step(step, 0, loss_scale=weight)

    def after_optimizer_step(self) -> None:
        """What SoftAlign does after each optimiser step besides the step itself: AGSM's EMA update."""
        trainer = self.trainer
        if trainer.args.objective == "agsm":
            trainer.trained.update_ema(trainer.args.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The SoftAlign tensors (trained and EMA), for the other trainer's checkpoint."""
        return self.trainer.trained.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what [`state_dict`] returned."""
        self.trainer.trained.load_state_dict(state)


def as_alignment_term(alongside) -> AlignmentTerm | None:
    """`alongside` as an [`AlignmentTerm`]: a [`SoftAlignTrainer`] gives its term; a term (or `None`) passes."""
    if alongside is None or isinstance(alongside, AlignmentTerm):
        return alongside
    if callable(getattr(alongside, "alignment_term", None)):
        return alongside.alignment_term()
    raise TypeError(f"alongside must be a SoftAlignTrainer or an AlignmentTerm, got {type(alongside).__name__}.")
