"""One run per output directory: an advisory `flock` that the kernel drops when the process dies."""

from __future__ import annotations

import os
from pathlib import Path

LOCK_NAME = ".softalign.lock"


class RunLock:
    """Hold `output_dir/.softalign.lock` for the duration of a `with` block.

    A second run on the same directory fails at once with an error naming the holder's pid. The lock is an OS file
    lock, not the file's existence, so a run killed with SIGKILL never leaves a stale lock behind.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(output_dir) / LOCK_NAME
        self.enabled = enabled
        self._handle = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RuntimeError(
                f"Another softalign run (pid {holder}) is using {self.path.parent}; choose another output_dir or "
                "wait for it to finish."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
