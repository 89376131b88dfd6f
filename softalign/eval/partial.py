"""An evaluation's verdicts so far, so that a killed run continues where it stopped instead of drawing it all again.

A full table is dozens of evaluations of a thousand images or more; on a CPU each takes many minutes, and a working
session ends wherever it is. `run_evaluation` appends every finished batch's rows to `results.partial.jsonl`, after
recording its key and batch size in `progress.json`. A later call with the same key and batch size reads those rows
back and draws only the batches after them: every image has its own seeded generator and the batches fall on the same
boundaries, so the finished run equals an uninterrupted one. The two files are removed once `results.jsonl` is
written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

PROGRESS = "progress.json"
PARTIAL = "results.partial.jsonl"


class PartialResults:
    """The rows of the finished batches of one evaluation in `out` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, key: Mapping, batch_size: int, overwrite: bool = False):
        self.out = Path(out)
        self.rows = self._read(dict(key), batch_size, overwrite)

    def _read(self, key: dict, batch_size: int, overwrite: bool) -> list[dict]:
        progress, partial = self.out / PROGRESS, self.out / PARTIAL
        mine = {"key": key, "batch_size": batch_size}
        if progress.is_file():
            try:
                written = json.loads(progress.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                written = None
            if written == mine and partial.is_file():
                return self._complete_batches(partial, batch_size)
            if written is not None and written.get("key") != key and not overwrite:
                raise FileExistsError(
                    f"{self.out} holds an unfinished evaluation of other weights or settings ({progress}); choose "
                    "another output directory, or overwrite it explicitly (--overwrite / overwrite=True)."
                )
        # A fresh start (or another batch size, which would move the batch boundaries): nothing to reuse.
        self.out.mkdir(parents=True, exist_ok=True)
        partial.write_text("", encoding="utf-8")
        staging = progress.with_name(PROGRESS + ".tmp")
        staging.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")
        os.replace(staging, progress)
        return []

    @staticmethod
    def _complete_batches(partial: Path, batch_size: int) -> list[dict]:
        rows = []
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line a kill cut short, always the last
                break
        rows = rows[: len(rows) - len(rows) % batch_size]  # a batch is written whole, or redrawn whole
        with partial.open("w", encoding="utf-8") as file:  # drop what follows the last whole batch
            file.writelines(json.dumps(row) + "\n" for row in rows)
        return rows

    def append(self, rows: list[dict]) -> None:
        """Record one finished batch (the caller's rows list already holds it)."""
        with (self.out / PARTIAL).open("a", encoding="utf-8") as file:
            file.write("".join(json.dumps(row) + "\n" for row in rows))
            file.flush()
            os.fsync(file.fileno())

    def finish(self) -> None:
        """The run is written whole: nothing left to continue."""
        for name in (PARTIAL, PROGRESS):
            (self.out / name).unlink(missing_ok=True)
