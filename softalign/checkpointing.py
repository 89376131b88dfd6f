"""Gradient checkpointing that recomputes each block with the LoRA adapters its forward pass used.

diffusers' checkpointing (`enable_gradient_checkpointing`) reruns a block's forward in the backward pass with the
model as it is *then*. AGSM with a LoRA routes psi+ rows and psi- rows through two PEFT adapters, one group after the
other, and backward runs after both: the stock recomputation would push every row through the adapter active at that
moment, so psi- rows would give psi+ gradients and no error would say so. The checkpointing function below records
each checkpointed block's active adapters when it runs forward and activates them again around its recomputation
(restoring `requires_grad` as it was, since PEFT's `set_adapter` also changes it). Soft tokens need nothing of this:
their injection keeps its own per-call state (see `injection.py`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_TUNER_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    if module not in _TUNER_LAYERS:
        from peft.tuners.tuners_utils import BaseTunerLayer

        _TUNER_LAYERS[module] = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    return _TUNER_LAYERS[module]


def checkpoint_with_active_adapters(module: nn.Module, *args):
    """diffusers' `gradient_checkpointing_func` contract: `checkpoint(module.__call__, *args)`, non-reentrant, with the
    adapters active in this forward call active again when the backward pass recomputes it."""
    layers = _tuner_layers(module) if isinstance(module, nn.Module) else []
    active = [list(layer.active_adapters) for layer in layers]

    def run(*inner):
        if all(list(layer.active_adapters) == names for layer, names in zip(layers, active, strict=True)):
            return module(*inner)
        previous = [list(layer.active_adapters) for layer in layers]
        flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
        try:
            for layer, names in zip(layers, active, strict=True):
                layer.set_adapter(names)
            for p, flag in flags:
                p.requires_grad_(flag)
            return module(*inner)
        finally:
            for layer, names in zip(layers, previous, strict=True):
                layer.set_adapter(names)
            for p, flag in flags:
                p.requires_grad_(flag)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def enable_gradient_checkpointing(denoiser: nn.Module) -> None:
    """Turn on the denoiser's own (diffusers) gradient checkpointing with [`checkpoint_with_active_adapters`]."""
    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_active_adapters)
