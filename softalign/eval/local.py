"""Checks before `from_pretrained` on a local directory: nothing downloads, and a missing file is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CLIP_TOKENIZER = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def local_dir(path: str | os.PathLike, what: str, expected: str, weights: bool = True) -> Path:
    """`path` as a `Path` if it is a directory with a `config.json` (and weights), else a `FileNotFoundError` that
    names the directory, `what` it should hold and the `expected` files."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: {folder} is not a directory; expected a local copy of {expected}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {folder} has no config.json; expected the files of {expected}")
    if weights and not any((folder / name).is_file() for name in WEIGHTS):
        raise FileNotFoundError(f"{what}: {folder} has no weights; expected one of {list(WEIGHTS)} ({expected})")
    return folder


def read_config(folder: Path) -> dict:
    """The `config.json` of a local model directory, with an error that names the file."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON config ({error})") from None


def require_model_type(folder: Path, config: dict, model_types: tuple[str, ...], what: str) -> None:
    """Refuse a checkpoint whose `model_type` is not one of `model_types`, naming the directory."""
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{folder / 'config.json'}: model_type is {model_type!r}; {what} expects {' or '.join(model_types)}"
        )


def require_tokenizer(folder: Path, what: str) -> None:
    """Refuse a directory without the CLIP tokenizer files, listing the files expected."""
    if not any(all((folder / name).is_file() for name in group) for group in CLIP_TOKENIZER):
        raise FileNotFoundError(
            f"{what}: {folder} has no tokenizer; expected tokenizer.json, or vocab.json and merges.txt "
            "(save the CLIP processor or tokenizer into the directory)"
        )
