"""What every softalign trainer does with accelerate: build the accelerator and average gradients over processes."""

from __future__ import annotations

import torch


def make_accelerator(mixed_precision: str, output_dir: str, log_with: str | None = None):
    """An `Accelerator` for a trainer. With no accelerator device, `cpu=True` lets torchrun / `accelerate launch` form a
    gloo process group (accelerate only picks multi-process CPU training when asked for the CPU)."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=output_dir,
    )


def average_gradients(accelerator, params) -> None:
    """Mean of each parameter's gradient over processes, so every rank takes the same optimiser step. A parameter
    without a gradient on this rank contributes zeros (every rank must join the all-reduce)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")
