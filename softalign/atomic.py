"""Write a directory so that readers see either the old one or the complete new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` (and the directories) to disk before the rename that publishes them."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(directory)


def _fsync_directory(directory) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` by renames.

    If the body raises (full disk, permission denied, a bug), the temporary directory is removed and `target` is left
    exactly as it was. An existing `target` is moved aside first and deleted only after the new one is in place, so
    at every instant one complete copy exists on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = target.parent / f".{target.name}.old-{token}"
    if target.exists():
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        if previous.exists():
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(target.parent)
    shutil.rmtree(previous, ignore_errors=True)
