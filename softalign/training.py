"""The plumbing every softalign trainer shares, as plain functions (no base class): the accelerator, seeding per
step, trackers, the saved run config, the trained adapters, and checkpoints.

Checkpoint directories carry an integrity record: written atomically, verified before loading, rotated.
`checkpoint-<step>/` holds the trainer's files plus `integrity.json` (SHA-256 and size of every file). A checkpoint
whose record is missing or does not match (truncated, corrupted, half-copied) is never loaded: resuming falls back to
the newest good one with a warning that names the bad one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_directory, atomic_write_text


# -- the trainer state every trainer exposes --------------------------------------------------------------------------
@dataclass
class TrainerState:
    """What `trainer.state` holds for every softalign trainer (and `train()` returns).

    Args:
        global_step (`int`): optimiser steps taken.
        log_history (`list[dict]`): the logged records, oldest first.
        skipped_steps (`int`): steps skipped for a non-finite loss (`on_nonfinite_loss="skip"`).
        epoch (`int`): completed epochs (DDPO: sampling + training epochs; 0 for step-based trainers).
    """

    global_step: int = 0
    log_history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    epoch: int = 0

    # For one release, the state also reads as the list of log records the RL trainers' `train()` used to return.
    def __getitem__(self, index):
        return self.log_history[index]

    def __len__(self) -> int:
        return len(self.log_history)

    def __iter__(self):
        return iter(self.log_history)


# -- accelerator and gradients ----------------------------------------------------------------------------------------
def make_accelerator(mixed_precision: str, output_dir: str, log_with: str | None = None):
    """An `Accelerator` for a trainer. With no accelerator device, `cpu=True` lets torchrun / `accelerate launch` form a
    gloo process group (accelerate only picks multi-process CPU training when asked for the CPU)."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=mixed_precision,
        log_with=None if log_with in (None, "none") else log_with,
        project_dir=output_dir,
    )


def average_gradients(accelerator, params) -> None:
    """Mean of each parameter's gradient over processes, so every rank takes the same optimiser step. A parameter
    without a gradient on this rank contributes zeros (every rank must join the all-reduce)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, micro-batch, process), so a resumed run draws
    exactly what an uninterrupted one would have drawn."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 131 + rank)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation of `n` seeded by `seed + epoch`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


# -- trackers and the run config -------------------------------------------------------------------------------------
def start_trackers(accelerator, project: str, config: dict) -> None:
    """Start accelerate's trackers (when the accelerator has any) with the run config, flattened for them."""
    if accelerator.log_with:
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in config.items()}
        accelerator.init_trackers(project, config=flat)


def log_to_trackers(accelerator, logs: dict, step: int) -> None:
    """Log the numeric values of `logs` at `step` to the trackers (no-op without any)."""
    if accelerator.log_with:
        accelerator.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=step)


def finish_trackers(accelerator) -> None:
    """Close the trackers. Not `accelerator.end_training()`: it destroys the process group, and the next trainer of a
    chain (SoftAlign -> DDPO -> ...) runs in the same processes."""
    for tracker in accelerator.trackers:
        tracker.finish()


def config_dict(config) -> dict:
    """A config dataclass as a JSON-ready dict (its own `to_dict()` when it has one)."""
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def save_run_config(config, path: str | os.PathLike) -> Path:
    """Write a run config (a dataclass) as JSON atomically; a failed write leaves the previous file intact."""
    path = Path(path)
    atomic_write_text(path, json.dumps(config_dict(config), indent=2, sort_keys=True, default=str) + "\n")
    return path


def save_trained(
    accelerator,
    trainable,
    output_dir: str | os.PathLike | None,
    run_dir: Path,
    config=None,
    config_name: str = "config.json",
    **metadata,
) -> Path:
    """`save_model()` of every trainer: the trained soft tokens to `output_dir` (default `<run_dir>/adapter`) in the
    adapter format, each trained LoRA to `<its parent>/lora/<name>/`, and the run `config` (when given) beside them as
    `config_name`; only the main process writes."""
    target = Path(output_dir) if output_dir is not None else Path(run_dir) / "adapter"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainable.save(target, **metadata)
        if config is not None:
            save_run_config(config, target.parent / config_name)
    return target


def read_config_file(path: str | os.PathLike, kind: str = "config") -> dict:
    """The mapping in a YAML (or JSON) config file, with errors that name the file: the one config reader of the CLI,
    the configs' `from_file` and the recipes."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of {kind} fields, got {type(data).__name__}.")
    return data


# -- checkpoints ------------------------------------------------------------------------------------------------------

INTEGRITY_NAME = "integrity.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_integrity(directory: Path) -> None:
    """Write `integrity.json`: the SHA-256 and size of every other file in `directory`."""
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
    from safetensors.torch import save_file

    save_file(trainable.state_dict(), str(folder / "trainable.safetensors"))
    torch.save({name: obj.state_dict() for name, obj in optimizers.items()}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def safe_torch_load(path: str | os.PathLike):
    """`torch.load(path, weights_only=True)` of a checkpoint file; a pickle that `weights_only` refuses is reported with
    softalign's own message (torch's suggests `weights_only=False`, an unsafe load softalign never makes)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "global" in line.lower()]
        reason = lines[0].rstrip(".") if lines else "it holds objects other than tensors and plain containers"
        raise ValueError(
            f"Refused to resume from {path}: {reason}. softalign reads checkpoint files with weights_only=True and "
            "never unpickles arbitrary objects; resume from a checkpoint softalign wrote, or start afresh."
        ) from None


def read_training_files(path: Path, trainable, optimizers: dict) -> dict:
    """Restore what [`write_training_files`] wrote into `trainable` and `optimizers`; return the trainer state."""
    from safetensors.torch import load_file

    trainable.load_state_dict(load_file(str(path / "trainable.safetensors")))
    saved = safe_torch_load(path / "optimizer.pt")
    for name, obj in optimizers.items():
        obj.load_state_dict(saved[name])
    return json.loads((path / "trainer_state.json").read_text())
