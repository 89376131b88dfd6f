"""Convert the soft tokens released with the SoftREPA and AGSM papers into softalign adapters.

Released layouts (`softrepa/SoftREPA` `tokens/<model>/`, `jaayeon/AGSM` `checkpoints/<model>/`):

| file | SD1.5 | SDXL | SD3 |
|---|---|---|---|
| SoftREPA `dc_tokens.pth` (one bank) | `(4, 768)` | `(4, 2048)` | `(5, 4, 1536)` |
| SoftREPA `dc_t_tokens.pth` (optional) | `Embedding(100, 768)` | - | `Embedding(100, 7680)` |
| AGSM `soft_tokens.pth` (psi+, psi-) | `(2, 4, 768)` | `(2, 4, 2048)` | `(2, 5, 4, 1536)` |
| AGSM `soft_t_tokens.pth` | `Embedding(100, 768)` | `Embedding(100, 2048)` | `Embedding(100, 7680)` |

The timestep files are pickled `torch.nn.Embedding` modules, so they are read with `weights_only=True` and exactly
that one class allowed; anything else in a pickle is refused.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .families import family_for_tokens
from .soft_tokens import SoftTokens, SoftTokensConfig

FORMATS = {
    "softrepa": ("dc_tokens.pth", "dc_t_tokens.pth"),
    "agsm": ("soft_tokens.pth", "soft_t_tokens.pth"),
}


def load_foreign_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Read a tensor from an untrusted `.pth` file: `torch.load(weights_only=True)` with only `nn.Embedding` allowed.

    Accepts a tensor, an `nn.Parameter`, a pickled `nn.Embedding` (its weight) or a `{"weight": tensor}` state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Token file not found: {path}")
    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 writes a zip archive
        raise ValueError(f"{path} is not a readable PyTorch file (expected the zip archive torch.save writes).")
    try:
        with torch.serialization.safe_globals([torch.nn.Embedding]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "global" in line.lower()]
        reason = lines[0].rstrip(".") if lines else "it holds objects other than tensors and nn.Embedding"
        raise ValueError(
            f"Refused to load {path}: {reason}. softalign reads foreign .pth files with weights_only=True and allows "
            "only tensors and torch.nn.Embedding."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable PyTorch file: {error}") from error
    if isinstance(obj, torch.nn.Embedding):
        obj = obj.weight
    elif isinstance(obj, dict) and set(obj) == {"weight"}:
        obj = obj["weight"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor or an nn.Embedding.")
    return obj.detach().to(torch.float32).clone()


def convert_official_tokens(
    src: str | os.PathLike,
    format: str,
    family: str | None = None,
    unet_blocks: list[str] | None = None,
) -> SoftTokens:
    """Read released SoftREPA / AGSM tokens into a [`SoftTokens`] module.

    Args:
        src (`str` or `os.PathLike`): the directory holding the `.pth` files, or the token file itself (its timestep
            file is looked up beside it).
        format (`str`): `"softrepa"` (one bank; SD3 tokens prepended) or `"agsm"` (psi+, psi-; SD3 tokens appended).
        family (`str`, *optional*): `"sd15"`, `"sd2"`, `"sdxl"` or `"sd3"`; inferred from the shapes when omitted.
        unet_blocks (`list[str]`, *optional*): UNet block groups the tokens were trained on; defaults to the official
            training scripts' (SoftREPA SD1.5: down; otherwise down + mid).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}.")
    src = Path(src)
    token_name, timestep_name = FORMATS[format]
    token_file = src / token_name if src.is_dir() else src
    if not token_file.is_file():
        raise FileNotFoundError(f"{format} token file not found: {token_file} (expected {token_name}).")
    tokens = load_foreign_tensor(token_file)
    if format == "softrepa":
        tokens = tokens.unsqueeze(0)  # add the bank axis
    if tokens.dim() not in (3, 4):
        expected = "(n, D) or (layers, n, D)" if format == "softrepa" else "(banks, n, D) or (banks, layers, n, D)"
        raise ValueError(f"{token_file}: tokens of shape {tuple(tokens.shape)}; expected {expected}.")
    if format == "agsm" and tokens.shape[0] != 2:
        raise ValueError(
            f"{token_file}: AGSM tokens need a leading bank axis of 2 (psi+, psi-), got {tuple(tokens.shape)}."
        )
    mmdit = tokens.dim() == 4
    family = family_for_tokens(tokens.shape, family, source=str(token_file))
    timestep_file = token_file.with_name(timestep_name)
    timestep_weight = load_foreign_tensor(timestep_file) if timestep_file.is_file() else None

    settings = dict(dim=tokens.shape[-1], n_tokens=tokens.shape[-2], timestep_embedding=timestep_weight is not None)
    settings["init"] = "normal"  # irrelevant once trained values are loaded
    if mmdit:
        settings["n_layers"] = tokens.shape[1]
    elif unet_blocks is not None:
        settings["unet_blocks"] = list(unet_blocks)
    config = SoftTokensConfig.for_family(family, objective=format, **settings)
    soft_tokens = SoftTokens(config)
    expected = config.parameter_shapes()
    state = {"tokens": tokens}
    if timestep_weight is not None:
        if tuple(timestep_weight.shape) != expected["timestep_embedding.weight"]:
            raise ValueError(
                f"{timestep_file}: timestep embedding of shape {tuple(timestep_weight.shape)}, expected "
                f"{expected['timestep_embedding.weight']} for tokens of shape {tuple(tokens.shape)}."
            )
        state["timestep_embedding.weight"] = timestep_weight
    soft_tokens.load_state_dict(state)
    return soft_tokens
