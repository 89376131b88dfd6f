"""Soft tokens on disk and on a pipeline: `save_soft_tokens`, `load_soft_tokens`, `unload_soft_tokens`.

Format (PEFT-like): a directory with `adapter_config.json` (the [`SoftTokensConfig`]) and `adapter_model.safetensors`
(float32 tensors keyed like `SoftTokens.state_dict()`; the config is repeated in the safetensors header under
`adapter_config`). Safetensors only: nothing on this path unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .atomic import atomic_directory
from .injection import SoftTokenInjection, attach_soft_tokens, check_compatible, injection_of
from .soft_tokens import SoftTokens, SoftTokensConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "softalign.soft_tokens"


def save_soft_tokens(soft_tokens, path: str | os.PathLike) -> Path:
    """Write soft tokens to the directory `path` atomically (a failed write leaves any previous adapter intact).

    Args:
        soft_tokens ([`SoftTokens`], [`SoftTokenInjection`] or a pipeline carrying soft tokens): what to save.
        path (`str` or `os.PathLike`): the adapter directory to create or replace.

    Returns:
        `Path`: the directory written.
    """
    from safetensors.torch import save_file

    soft_tokens = _soft_tokens_from(soft_tokens)
    config = {"format": FORMAT, **soft_tokens.config.to_dict()}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in soft_tokens.state_dict().items()}
    path = Path(path)
    with atomic_directory(path) as staging:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "adapter_config": json.dumps(config)})
    return path


def read_soft_tokens(path: str | os.PathLike) -> SoftTokens:
    """Read a soft-token adapter directory into a new [`SoftTokens`] module (on the CPU), validating every tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Soft-token adapter directory not found: {path}")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for required in (config_file, weights_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"Soft-token adapter {path} is missing {required.name} (expected {CONFIG_NAME} and {WEIGHTS_NAME})."
            )
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{config_file} is not a softalign soft-token config (format {found!r}, expected {FORMAT!r}).")
    config = SoftTokensConfig.from_dict(data, source=str(config_file))
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from error
    expected = config.parameter_shapes()
    if set(tensors) != set(expected):
        raise ValueError(f"{weights_file} holds tensors {sorted(tensors)}, but its config expects {sorted(expected)}.")
    for name, shape in expected.items():
        if tensors[name].dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(
                f"{weights_file}: tensor {name!r} is {tensors[name].dtype}; expected a float16/bfloat16/float32/"
                "float64 tensor."
            )
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, its config expects {shape}."
            )
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{weights_file}: tensor {name!r} contains NaN or Inf values.")
    soft_tokens = SoftTokens(config)
    soft_tokens.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return soft_tokens


def load_soft_tokens(pipe, path: str | os.PathLike, default_bank: int = 0) -> SoftTokenInjection:
    """Load a soft-token adapter into a pipeline; the stock `pipe(prompt)` then generates with the tokens.

    Args:
        pipe: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline` (or a denoiser).
        path (`str` or `os.PathLike`): an adapter directory written by [`save_soft_tokens`] or `softalign convert`.
        default_bank (`int`, *optional*, defaults to 0): the bank used for every row, psi+ for AGSM tokens.

    Returns:
        [`SoftTokenInjection`]: the attached injection (`.soft_tokens` holds the parameters).

    Example:
        ```py
        >>> from diffusers import StableDiffusionPipeline
        >>> from softalign import load_soft_tokens
        >>> pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")
        >>> load_soft_tokens(pipe, "runs/agsm/adapter")
        >>> image = pipe("three apples on a table").images[0]
        ```
    """
    if injection_of(pipe) is not None:
        raise ValueError("This pipeline already carries soft tokens; call `unload_soft_tokens(pipe)` first.")
    soft_tokens = read_soft_tokens(path)
    check_compatible(soft_tokens.config, pipe)
    return attach_soft_tokens(pipe, soft_tokens, default_bank=default_bank)


def unload_soft_tokens(pipe) -> SoftTokens | None:
    """Detach the soft tokens from a pipeline (its denoiser is then bit-identical to the base) and return them."""
    injection = injection_of(pipe)
    if injection is None:
        return None
    injection.detach()
    return injection.soft_tokens


def _soft_tokens_from(obj) -> SoftTokens:
    if isinstance(obj, SoftTokens):
        return obj
    if isinstance(obj, SoftTokenInjection):
        return obj.soft_tokens
    injection = injection_of(obj)
    if injection is None:
        raise ValueError(f"Expected SoftTokens, a SoftTokenInjection or a pipeline carrying soft tokens, got {obj!r}.")
    return injection.soft_tokens


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' `save_lora_adapter` writes


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "softalign") -> str:
    """Load a LoRA written by a softalign trainer (`<run>/lora/<name>/`) into the pipeline's denoiser and make it the
    active adapter; returns its name. Fails with the path when the directory holds no adapter weights."""
    from .families import denoiser_of

    path = Path(path)
    if not (path / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} holds no LoRA adapter: expected {LORA_WEIGHTS} (from save_lora_adapter).")
    denoiser = denoiser_of(pipe)
    denoiser.load_lora_adapter(
        str(path), adapter_name=adapter_name, prefix=None, weight_name=LORA_WEIGHTS, use_safetensors=True
    )
    denoiser.set_adapter(adapter_name)
    return adapter_name
