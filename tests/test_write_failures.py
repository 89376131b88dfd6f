"""Write failures (issue 7, item 2): a full disk or a refused permission while a checkpoint, an adapter or the cache is
written leaves the previous one intact (it still verifies, byte for byte), and the run stops with the OS error.

The failures are injected by patching the writers (`safetensors.torch.save_file`, `torch.save`, the integrity record,
the publishing rename, `Path.write_text`): the tests run as root here, where a read-only directory does not stop a
write (the chmod variant runs only for other users). A simulated full disk writes half of the file first, as a real
one does. Each scenario is a plain function returning a `FaultOutcome`, so `scripts/reliability_report.py` can run
them too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import torch
from shapes_data import shapes_pairs

from softalign.run_lock import RunLock
from softalign.soft_tokens import SoftTokens
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline
from softalign.training import list_checkpoints, verify

PAIRS = shapes_pairs()
FAIL_AT = 3  # the checkpoint whose write fails


@dataclass
class FaultOutcome:
    name: str
    error: str = ""  # first line of the error the run stopped with
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.error) and all(self.checks.values())


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _denied(path) -> OSError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _half_written(path) -> OSError:
    """What a full disk does: part of the file lands, then the write fails."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return _no_space(path)


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _staging(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _lock_is_free(directory: Path) -> bool:
    try:
        with RunLock(directory):
            return True
    except RuntimeError:
        return False


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# -- the faults, each a context manager that breaks one write of checkpoint FAIL_AT --------------------------------
def _in_failing_checkpoint(path) -> bool:
    return f".checkpoint-{FAIL_AT}.tmp-" in str(path)


@contextlib.contextmanager
def disk_full_in_safetensors():
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if _in_failing_checkpoint(filename):
            raise _half_written(filename)

    with mock.patch("safetensors.torch.save_file", save_file):
        yield


@contextlib.contextmanager
def disk_full_in_torch_save():
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if _in_failing_checkpoint(f):
            raise _half_written(f)

    with mock.patch("torch.save", save):
        yield


@contextlib.contextmanager
def permission_denied_on_integrity_record():
    import softalign.training as checkpoints

    real = checkpoints.write_integrity

    def write_integrity(directory):
        if _in_failing_checkpoint(directory):
            raise _denied(Path(directory) / checkpoints.INTEGRITY_NAME)
        real(directory)

    with mock.patch.object(checkpoints, "write_integrity", write_integrity):
        yield


@contextlib.contextmanager
def permission_denied_on_publishing_rename(marker: Callable[[str], bool] = _in_failing_checkpoint):
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if marker(str(src)):
            raise _denied(dst)
        return real(src, dst, *args, **kwargs)

    with mock.patch("os.replace", replace):
        yield


CHECKPOINT_FAULTS = {
    "checkpoint: disk full in trainable.safetensors": disk_full_in_safetensors,
    "checkpoint: disk full in optimizer.pt": disk_full_in_torch_save,
    "checkpoint: permission denied on integrity.json": permission_denied_on_integrity_record,
    "checkpoint: permission denied on the publishing rename": permission_denied_on_publishing_rename,
}


class Snapshots:
    """A callback that records the bytes of every checkpoint right after it is published."""

    def __init__(self):
        self.saved: dict[str, dict[str, str]] = {}

    def on_save(self, trainer, path):
        self.saved[path.name] = _snapshot(path)


def _config(run: Path, **overrides) -> SoftAlignConfig:
    settings = dict(output_dir=str(run), max_steps=4, save_steps=1, logging_steps=1, resolution=32, save_total_limit=3)
    return SoftAlignConfig(**{**settings, **overrides})


def softalign_checkpoint_fault(name: str, root: Path) -> FaultOutcome:
    """A SoftAlign run whose checkpoint FAIL_AT cannot be written: it stops there, checkpoints before it stay intact,
    nothing half-written is left, the lock is released, and "latest" resumes from the last good one."""
    outcome = FaultOutcome(name)
    run = Path(root) / "run"
    snapshots = Snapshots()
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), _config(run), PAIRS, callbacks=[snapshots])
    with CHECKPOINT_FAULTS[name]():
        try:
            trainer.train()
        except OSError as error:
            outcome.error = _first_line(error)
            outcome.checks["error names the file"] = bool(error.filename) and str(run) in str(error.filename)
            outcome.checks["error is ENOSPC / EACCES"] = error.errno in (errno.ENOSPC, errno.EACCES)
    outcome.checks["run stopped at the failing step"] = trainer.state.global_step == FAIL_AT
    on_disk = [p.name for p in list_checkpoints(run)]
    outcome.checks["only the earlier checkpoints exist"] = on_disk == [f"checkpoint-{s}" for s in range(1, FAIL_AT)]
    outcome.checks["earlier checkpoints verify, byte for byte"] = all(
        verify(run / n) is None and _snapshot(run / n) == snapshots.saved.get(n) for n in on_disk
    )
    outcome.checks["no staging directory left"] = not _staging(run)
    outcome.checks["lock released"] = _lock_is_free(run)
    resumed = SoftAlignTrainer(tiny_pipeline("sd15"), _config(run, resume_from_checkpoint="latest"), PAIRS)
    resumed.train()
    outcome.checks["resumes from the last good checkpoint"] = [r["step"] for r in resumed.state.log_history] == [
        *range(1, 5)
    ] and resumed.state.global_step == 4
    return outcome


def ddpo_checkpoint_fault(name: str, root: Path) -> FaultOutcome:
    """The same for DDPO: its checkpoint FAIL_AT (after epoch FAIL_AT) hits a full disk."""
    from softalign import SoftTokens, SoftTokensConfig
    from softalign.families import context_dim_of
    from softalign.rl.ddpo_config import DDPOConfig
    from softalign.rl.ddpo_trainer import DDPOTrainer

    outcome = FaultOutcome(name)
    run = Path(root) / "ddpo"

    def make(**overrides):
        pipe = tiny_pipeline("sd15")
        torch.manual_seed(0)
        tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=context_dim_of(pipe), init="normal"))
        settings = dict(
            output_dir=str(run),
            num_epochs=4,
            sample_num_steps=2,
            sample_batch_size=2,
            sample_num_batches_per_epoch=1,
            train_batch_size=2,
            resolution=32,
        )
        config = DDPOConfig(**{**settings, **overrides})
        return DDPOTrainer(config, lambda i, p, m: (i.mean(dim=(1, 2, 3)), {}), lambda: ("a cat", {}), pipe, tokens)

    trainer = make()
    snapshots = {}
    save = trainer.save_checkpoint

    def save_and_snapshot():
        path = save()
        snapshots[path.name] = _snapshot(path)
        return path

    trainer.save_checkpoint = save_and_snapshot
    with disk_full_in_safetensors():
        try:
            trainer.train()
        except OSError as error:
            outcome.error = _first_line(error)
            outcome.checks["error is ENOSPC"] = error.errno == errno.ENOSPC
    outcome.checks["run stopped at the failing epoch"] = trainer.epoch == FAIL_AT
    on_disk = [p.name for p in list_checkpoints(run)]
    outcome.checks["only the earlier checkpoints exist"] = on_disk == [f"checkpoint-{s}" for s in range(1, FAIL_AT)]
    outcome.checks["earlier checkpoints verify, byte for byte"] = all(
        verify(run / n) is None and _snapshot(run / n) == snapshots.get(n) for n in on_disk
    )
    outcome.checks["no staging directory left"] = not _staging(run)
    outcome.checks["lock released"] = _lock_is_free(run)
    resumed = make(resume_from="latest")
    resumed.train()
    outcome.checks["resumes from the last good checkpoint"] = [r["epoch"] for r in resumed.log_history] == [0, 1, 2, 3]
    return outcome


# -- adapters -------------------------------------------------------------------------------------------------------
def _adapter_fault(kind: str):
    def in_adapter(path) -> bool:
        return ".adapter.tmp-" in str(path)

    if kind == "disk full in adapter_model.safetensors":
        import safetensors.torch

        real = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            if in_adapter(filename):
                raise _half_written(filename)

        return mock.patch("safetensors.torch.save_file", save_file)
    if kind == "permission denied on adapter_config.json":
        real_write = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if in_adapter(self):
                raise _denied(self)
            return real_write(self, *args, **kwargs)

        return mock.patch.object(pathlib.Path, "write_text", write_text)
    return permission_denied_on_publishing_rename(in_adapter)  # after the old adapter was moved aside


ADAPTER_FAULTS = (
    "disk full in adapter_model.safetensors",
    "permission denied on adapter_config.json",
    "permission denied on the publishing rename",
)


def adapter_fault(kind: str, root: Path) -> FaultOutcome:
    """`trainer.save_model()` over an earlier adapter fails: the earlier adapter is intact and still loads."""
    outcome = FaultOutcome(f"adapter: {kind}")
    run = Path(root) / "run"
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), _config(run, max_steps=1, save_steps=0), PAIRS)
    trainer.train()
    adapter = trainer.save_model()
    before = _snapshot(adapter)
    tensors = {k: v.clone() for k, v in trainer.soft_tokens.state_dict().items()}
    with torch.no_grad():
        trainer.soft_tokens.tokens.add_(1.0)  # what a later save would write
    with _adapter_fault(kind):
        try:
            trainer.save_model()
        except OSError as error:
            outcome.error = _first_line(error)
            outcome.checks["error is ENOSPC / EACCES"] = error.errno in (errno.ENOSPC, errno.EACCES)
    outcome.checks["previous adapter intact, byte for byte"] = _snapshot(adapter) == before
    loaded = SoftTokens.from_pretrained(adapter).state_dict()
    outcome.checks["previous adapter still loads"] = all(torch.equal(loaded[k], v) for k, v in tensors.items())
    outcome.checks["no staging directory left"] = not _staging(run)
    return outcome


def run_config_fault(root: Path) -> FaultOutcome:
    """`save_model()` also rewrites `softalign_config.json`; a full disk there must not destroy the earlier one."""
    outcome = FaultOutcome("run config: disk full in softalign_config.json")
    run = Path(root) / "run"
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), _config(run, max_steps=1, save_steps=0), PAIRS)
    trainer.train()
    config_file = run / "softalign_config.json"
    before = config_file.read_bytes()
    real_write = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if "softalign_config.json" in self.name:  # the file or its temporary twin
            open(self, "w").close()  # open(..., "w") truncates before the first write fails
            raise _no_space(self)
        return real_write(self, *args, **kwargs)

    with mock.patch.object(pathlib.Path, "write_text", write_text):
        try:
            trainer.save_model()
        except OSError as error:
            outcome.error = _first_line(error)
    outcome.checks["previous softalign_config.json intact"] = config_file.read_bytes() == before
    return outcome


def cache_fault(root: Path) -> FaultOutcome:
    """A full disk while the encoding cache writes a new shard: the run stops, the existing cache stays usable."""
    outcome = FaultOutcome("cache: disk full in a new latent shard")
    cache = Path(root) / "cache"
    first = SoftAlignTrainer(tiny_pipeline("sd15"), _config(Path(root) / "a", cache_dir=str(cache)), PAIRS[:8])
    first.prepare_data()
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise _half_written(filename)

    second = SoftAlignTrainer(tiny_pipeline("sd15"), _config(Path(root) / "b", cache_dir=str(cache)), PAIRS)
    with mock.patch("safetensors.torch.save_file", save_file):
        try:
            second.prepare_data()
        except OSError as error:
            outcome.error = _first_line(error)
    third = SoftAlignTrainer(tiny_pipeline("sd15"), _config(Path(root) / "c", cache_dir=str(cache)), PAIRS[:8])
    stats = third.prepare_data().stats
    outcome.checks["earlier cache entries reused"] = (stats.images_reused, stats.images_encoded) == (8, 0)
    return outcome


def all_scenarios() -> list[tuple[str, Callable[[Path], FaultOutcome]]]:
    """Every scenario as (name, function of a fresh directory): the report script runs these."""
    scenarios = [(name, lambda root, n=name: softalign_checkpoint_fault(n, root)) for name in CHECKPOINT_FAULTS]
    scenarios.append(
        ("DDPO checkpoint: disk full", lambda root: ddpo_checkpoint_fault("DDPO checkpoint: disk full", root))
    )
    scenarios += [(f"adapter: {kind}", lambda root, k=kind: adapter_fault(k, root)) for kind in ADAPTER_FAULTS]
    scenarios.append(("cache: disk full in a new latent shard", cache_fault))
    scenarios.append(("run config: disk full in softalign_config.json", run_config_fault))
    return scenarios


# -- tests ----------------------------------------------------------------------------------------------------------
def _assert(outcome: FaultOutcome) -> None:
    assert outcome.error, f"{outcome.name}: the run did not stop with an error"
    failed = [check for check, passed in outcome.checks.items() if not passed]
    assert not failed, f"{outcome.name}: {failed} (error: {outcome.error})"


@pytest.mark.parametrize("name", list(CHECKPOINT_FAULTS), ids=lambda n: n.split(": ")[1].replace(" ", "-"))
def test_failed_checkpoint_write_keeps_the_previous_ones_and_stops(name, tmp_path):
    _assert(softalign_checkpoint_fault(name, tmp_path))


def test_failed_ddpo_checkpoint_write_keeps_the_previous_ones_and_stops(tmp_path):
    _assert(ddpo_checkpoint_fault("DDPO checkpoint: disk full", tmp_path))


@pytest.mark.parametrize("kind", ADAPTER_FAULTS, ids=lambda k: k.replace(" ", "-"))
def test_failed_adapter_save_keeps_the_previous_adapter(kind, tmp_path):
    _assert(adapter_fault(kind, tmp_path))


def test_failed_cache_write_keeps_the_cache_usable(tmp_path):
    _assert(cache_fault(tmp_path))


def test_failed_run_config_write_keeps_the_previous_config(tmp_path):
    _assert(run_config_fault(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; covered by the patched faults")
def test_read_only_output_directory_keeps_the_checkpoints_and_stops(tmp_path):
    run = tmp_path / "run"
    SoftAlignTrainer(tiny_pipeline("sd15"), _config(run, max_steps=2), PAIRS).train()
    before = {p.name: _snapshot(p) for p in list_checkpoints(run)}
    run.chmod(0o555)
    try:
        with pytest.raises(OSError) as caught:
            SoftAlignTrainer(
                tiny_pipeline("sd15"), _config(run, max_steps=3, resume_from_checkpoint="latest"), PAIRS
            ).train()
        assert caught.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        assert {p.name: _snapshot(p) for p in list_checkpoints(run)} == before
    finally:
        run.chmod(0o755)


def test_a_killed_checkpoint_write_is_tidied_by_the_next_save(tmp_path):
    from softalign.training import save_checkpoint

    run = tmp_path / "run"
    (run / ".checkpoint-3.tmp-0badc0de").mkdir(parents=True)  # killed while writing: half-written
    (run / ".checkpoint-3.tmp-0badc0de" / "state.txt").write_text("hal")
    (run / ".checkpoint-2.old-0badc0de").mkdir()  # a moved-aside copy: never read, never deleted
    (run / ".notes.tmp-1").mkdir()  # not a checkpoint's staging directory: left alone
    save_checkpoint(run, 4, lambda folder: (folder / "state.txt").write_text("4"), limit=None)
    assert sorted(p.name for p in run.iterdir()) == [".checkpoint-2.old-0badc0de", ".notes.tmp-1", "checkpoint-4"]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-4"]
