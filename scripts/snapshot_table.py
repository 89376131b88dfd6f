"""Keep a results table's runs small enough to commit, and bring them back to continue the table elsewhere.

    python scripts/snapshot_table.py runs/full-sd15 docs/results/full-table-sd15      # keep (while it trains)
    python scripts/snapshot_table.py docs/results/full-table-sd15 runs/full-sd15      # restore, then re-run the table

Copies `SRC/rows/<run>/` into `DST/rows/<run>/`, leaving out what a resumed run rebuilds or does not need: the
stage-1 renders cache (`cache/`, rebuilt bit-identically from the seed), the evaluation images (`eval/*/images/`;
a curve point with a `summary.json` is never redrawn; one without is redrawn whole, so it is left out), every
stage-1 checkpoint but the newest (the one a resumed curve continues from) and the RL runs' checkpoints (a killed RL
run restarts; a finished one is its adapters, and of its newest checkpoint only `trainer_state.json`, the per-epoch
reward and KL record that its closing notes quote). Also the stage-1 `curves.png`, the table's `table-spec.yaml` and
`table/*.md|json`, the side-by-side `table/grid-*.png`, and every finished table cell (`table/<row>/cfg-<g>/` with
its `summary.json`, without its images: a restored table reuses it; an unfinished cell is scored again). Each file is
written to a temporary name and renamed, so an interrupted copy leaves whole files; files that are already the same
are left alone.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
from pathlib import Path

from softalign.run_lock import LOCK_NAME

TRAINING_RECORD = "trainer_state.json"  # an RL checkpoint's epoch, step and per-epoch log history (a few KB)


def newest_checkpoint(train: Path) -> str | None:
    steps = [p for p in train.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(steps, key=lambda p: int(p.name.split("-")[-1])).name if steps else None


def kept_files(src: Path):
    """Paths (relative to `src`) worth keeping."""
    for run in sorted(p for p in (src / "rows").iterdir() if p.is_dir()):
        finished = (run / "done.json").is_file()
        for path in sorted(run.rglob("*")):
            parts = path.relative_to(run).parts
            if not path.is_file() or path.name == LOCK_NAME:  # a lock is the running process's, not the run's
                continue
            if "cache" in parts or (parts[0] == "eval" and "images" in parts):  # the flagship's: stage1/cache
                continue
            if parts[0] == "eval" and len(parts) > 2 and not (run / "eval" / parts[1] / "summary.json").is_file():
                continue  # an evaluation still running: a resumed curve redraws it whole
            checkpoint = next((part for part in parts[:-1] if part.startswith("checkpoint-")), None)
            if checkpoint:  # the newest only: all of a curve's (it resumes there), a finished RL run's training record
                wanted = parts[0] == "train" or (finished and path.name == TRAINING_RECORD)  # a killed RL run restarts
                if not (wanted and checkpoint == newest_checkpoint(run.joinpath(*parts[: parts.index(checkpoint)]))):
                    continue
            yield path.relative_to(src)
    for name in ("curves.png", "table-spec.yaml", "table/table.md", "table/table.json"):
        if (src / name).is_file():
            yield Path(name)
    for grid in sorted((src / "table").glob("grid-*.png")):  # the side-by-side grids: drawn from images not kept
        yield grid.relative_to(src)
    for summary in sorted((src / "table").glob("*/*/summary.json")):  # the finished cells: never scored again
        for path in sorted(summary.parent.rglob("*")):
            if path.is_file() and "images" not in path.relative_to(summary.parent).parts:
                yield path.relative_to(src)


def copy(src: Path, dst: Path) -> int:
    copied = 0
    for relative in kept_files(src):
        source, target = src / relative, dst / relative
        if target.is_file() and filecmp.cmp(source, target, shallow=False):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".partial")
        shutil.copyfile(source, staging)
        os.replace(staging, target)
        copied += 1
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="A table directory (recipes/full_table.py --out), or a kept copy of one.")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    src = Path(args.src)
    if not (src / "rows").is_dir():
        parser.error(f"{src}: no rows/ folder; expected a table directory written by recipes/full_table.py --out")
    print(f"{copy(src, Path(args.dst))} file(s) copied into {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
