"""Soft tokens on disk and on a pipeline: `save_soft_tokens`, `load_soft_tokens`, `unload_soft_tokens`.

Format (PEFT-like): a directory with `adapter_config.json` (the [`SoftTokensConfig`]) and `adapter_model.safetensors`
(float32 tensors keyed like `SoftTokens.state_dict()`; the config is repeated in the safetensors header under
`adapter_config`). Safetensors only: nothing on this path unpickles.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from .families import base_model_record, denoiser_of
from .injection import SoftTokenInjection, attach_soft_tokens, check_compatible, injection_of
from .soft_tokens import CONFIG_NAME, FORMAT, WEIGHTS_NAME, SoftTokens  # noqa: F401 (the format, re-exported)


def save_soft_tokens(soft_tokens, path: str | os.PathLike, base_model: dict | None = None) -> Path:
    """Write soft tokens to the directory `path` atomically (a failed write leaves any previous adapter intact).

    Args:
        soft_tokens ([`SoftTokens`], [`SoftTokenInjection`] or a pipeline carrying soft tokens): what to save.
        path (`str` or `os.PathLike`): the adapter directory to create or replace.
        base_model (`dict`, *optional*): the model they were trained on (`softalign.families.base_model_record`);
            recorded from the pipeline when a pipeline is given.

    Returns:
        `Path`: the directory written.
    """
    if base_model is None and not isinstance(soft_tokens, (SoftTokens, SoftTokenInjection)):
        base_model = base_model_record(soft_tokens)
    elif base_model is None and isinstance(soft_tokens, SoftTokenInjection):
        base_model = base_model_record(soft_tokens.denoiser)
    return _soft_tokens_from(soft_tokens).save_pretrained(path, base_model=base_model)


def read_soft_tokens(path: str | os.PathLike) -> SoftTokens:
    """Deprecated alias of [`SoftTokens.from_pretrained`] (removed in the next release)."""
    warnings.warn(
        "read_soft_tokens is deprecated; use SoftTokens.from_pretrained(path).", DeprecationWarning, stacklevel=2
    )
    return SoftTokens.from_pretrained(path)


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
    soft_tokens = SoftTokens.from_pretrained(path)
    check_compatible(soft_tokens.config, pipe)
    _warn_on_other_base(soft_tokens, pipe, path)
    return attach_soft_tokens(pipe, soft_tokens, default_bank=default_bank)


def unload_soft_tokens(pipe) -> SoftTokens | None:
    """Detach the soft tokens from a pipeline (its denoiser is then bit-identical to the base) and return them."""
    injection = injection_of(pipe)
    if injection is None:
        return None
    injection.detach()
    return injection.soft_tokens


def _warn_on_other_base(soft_tokens: SoftTokens, pipe, path) -> None:
    """Warn when the adapter records a base model other than `pipe`'s (PEFT warns the same way)."""
    trained_on = soft_tokens.base_model
    if not trained_on:
        return
    here = base_model_record(pipe)
    names = trained_on.get("base_model_name_or_path"), here["base_model_name_or_path"]
    other_name = all(names) and Path(names[0]).name != Path(names[1]).name
    other_config = trained_on.get("base_model_config_hash") not in (None, here["base_model_config_hash"])
    if other_name or other_config:
        warnings.warn(
            f"The soft tokens in {path} were trained on {names[0] or trained_on.get('base_model_class')} (denoiser "
            f"config {trained_on.get('base_model_config_hash')}), but are loaded into {names[1] or here['base_model_class']} "
            f"(denoiser config {here['base_model_config_hash']}); they may not fit this model.",
            stacklevel=3,
        )


def _soft_tokens_from(obj) -> SoftTokens:
    if isinstance(obj, SoftTokens):
        return obj
    if isinstance(obj, SoftTokenInjection):
        return obj.soft_tokens
    injection = injection_of(obj)
    if injection is None:
        raise ValueError(f"Expected SoftTokens, a SoftTokenInjection or a pipeline carrying soft tokens, got {obj!r}.")
    return injection.soft_tokens


ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of UNet and MMDiT blocks


def lora_config(rank: int = 4, target_modules=ATTENTION_MODULES, **kwargs):
    """The `peft.LoraConfig` softalign's recipes and CLI train: rank `rank`, `lora_alpha = rank`, on the attention
    projections (`kwargs` go to `LoraConfig`, e.g. `init_lora_weights="gaussian"`).

    Example:
        ```py
        >>> from softalign import lora_config
        >>> trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipe, soft_tokens=tokens, peft_config=lora_config(4))
        ```
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"The LoRA rank must be a positive integer, got {rank!r}.")
    return LoraConfig(r=rank, lora_alpha=kwargs.pop("lora_alpha", rank), target_modules=list(target_modules), **kwargs)


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' `save_lora_adapter` writes


def load_lora(pipe, path: str | os.PathLike, adapter_name: str = "softalign") -> str:
    """Load a LoRA written by a softalign trainer (`<run>/lora/<name>/`) into the pipeline's denoiser and make it the
    active adapter; returns its name. Fails with the path when the directory holds no adapter weights."""
    path = Path(path)
    if not (path / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} holds no LoRA adapter: expected {LORA_WEIGHTS} (from save_lora_adapter).")
    denoiser = denoiser_of(pipe)
    denoiser.load_lora_adapter(
        str(path), adapter_name=adapter_name, prefix=None, weight_name=LORA_WEIGHTS, use_safetensors=True
    )
    denoiser.set_adapter(adapter_name)
    return adapter_name


def load_adapters(pipe, soft_tokens: str | os.PathLike | None = None, lora: str | os.PathLike | None = None):
    """Load the adapters a run produced into `pipe`: soft tokens first, then a LoRA (either may be None). The one place
    the command lines (`softalign eval`, the diagnostics under `scripts/`) attach what they were given."""
    if soft_tokens:
        load_soft_tokens(pipe, soft_tokens)
    if lora:
        load_lora(pipe, lora)
    return pipe


def load_pipeline(path: str | os.PathLike):
    """A diffusers pipeline from a local directory, never downloading (components saved as null, e.g. an SD3
    pipeline without T5, are passed as `None` as diffusers wants), with its progress bar off.

    Example:
        ```py
        >>> from softalign import load_pipeline, load_soft_tokens
        >>> pipe = load_pipeline("models/shapes-sd15")
        >>> load_soft_tokens(pipe, "runs/agsm/adapter")
        ```
    """
    from diffusers import DiffusionPipeline

    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json).")
    absent = {k: None for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[:1] == [None]}
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe
