"""Write a file or a directory so that readers see either the old one or the complete new one, never half of either.

Every writer of results, checkpoints, caches and reports in the library goes through here: a kill at any instant
leaves the previous version (or nothing) on disk, and two processes writing the same path never share a temporary.
"""

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
            _fsync_file(Path(directory, name))
        _fsync_directory(directory)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


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


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike):
    """Yield a temporary path beside `target` to write; on success it is flushed to disk and renamed over `target`.

    The temporary's name is unique per call (concurrent writers of one cache never write into each other's file) and
    it is created by the writer itself, so the result gets the ordinary permissions of the umask. If the body raises,
    the temporary is removed and `target` is left exactly as it was. Writers that infer a format from the file name
    (PIL, some savers) must be given the format: the temporary ends in `.tmp`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_directory(target.parent)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Replace `target` with `text` (UTF-8) atomically: a reader sees the old file or the whole new one."""
    with atomic_file(target) as temp:
        temp.write_text(text, encoding="utf-8")
