"""Checkpoint directories with an integrity record: written atomically, verified before loading, rotated.

`checkpoint-<step>/` holds the trainer's files plus `integrity.json` (SHA-256 and size of every file). A checkpoint
whose record is missing or does not match (truncated, corrupted, half-copied) is never loaded: resuming falls back to
the newest good one with a warning that names the bad one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from .atomic import atomic_directory

INTEGRITY_NAME = "integrity.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_integrity(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != INTEGRITY_NAME)
    record = {str(p.relative_to(directory)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (directory / INTEGRITY_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify(directory: str | os.PathLike) -> str | None:
    """`None` if the checkpoint is intact, else what is wrong with it."""
    directory = Path(directory)
    record_path = directory / INTEGRITY_NAME
    if not record_path.is_file():
        return f"no {INTEGRITY_NAME}"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"unreadable {INTEGRITY_NAME}"
    for name, expected in record.items():
        path = directory / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def save_checkpoint(output_dir: str | os.PathLike, step: int, write_files, limit: int | None) -> Path:
    """Create `checkpoint-<step>` atomically: `write_files(staging_dir)` writes the content, then the integrity record
    is added, then it is renamed into place; older checkpoints beyond `limit` are deleted afterwards."""
    target = Path(output_dir) / f"checkpoint-{step}"
    # Staging directories of a killed run are half-written by construction; the run lock admits one writer per run
    # directory, so none of them is in use. Moved-aside `.old-*` copies are left alone and never read.
    for staging in Path(output_dir).glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)
    with atomic_directory(target) as staging:
        write_files(staging)
        write_integrity(staging)
    if limit is not None:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary and staging directories are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_good_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that passes [`verify`]; every newer bad one is reported in a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"Skipping the damaged checkpoint {path} ({problem}); trying an older one.", stacklevel=2)
    return None


def resolve_checkpoint(output_dir: str | os.PathLike, requested: str | None) -> Path | None:
    """`None`, `'latest'` (newest good one, or none yet) or an explicit path that must be intact."""
    if requested is None:
        return None
    if requested == "latest":
        return latest_good_checkpoint(output_dir)
    path = Path(requested)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    problem = verify(path)
    if problem is not None:
        raise ValueError(f"Refusing to resume from the damaged checkpoint {path}: {problem}.")
    return path


def write_training_files(folder: Path, trainable, optimizers: dict, state: dict) -> None:
    """The files every trainer checkpoint holds: `trainable.safetensors` (trained and EMA tensors), `optimizer.pt`
    (optimiser / scheduler state dicts by name) and `trainer_state.json`."""
    import torch
    from safetensors.torch import save_file

    save_file(trainable.state_dict(), str(folder / "trainable.safetensors"))
    torch.save({name: obj.state_dict() for name, obj in optimizers.items()}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def read_training_files(path: Path, trainable, optimizers: dict) -> dict:
    """Restore what [`write_training_files`] wrote into `trainable` and `optimizers`; return the trainer state."""
    import torch
    from safetensors.torch import load_file

    trainable.load_state_dict(load_file(str(path / "trainable.safetensors")))
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    for name, obj in optimizers.items():
        obj.load_state_dict(saved[name])
    return json.loads((path / "trainer_state.json").read_text())
