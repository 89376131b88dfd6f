"""Plot a shapes-model training log (`<run-dir>/log.jsonl`) as PNG curves: one panel per stage, the loss smoothed
by a running mean over `--window` logged points (the raw per-batch loss is too noisy to read).

    python scripts/plot_training_log.py runs/shapes-sd15/log.jsonl models/eval/shapes-sd15-training.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from softalign.curves import plot_curves


def smoothed(points: list[dict], window: int) -> list[dict]:
    out = []
    for i, point in enumerate(points):
        recent = points[max(0, i - window + 1) : i + 1]
        out.append({"step": point["step"], "value": sum(p["value"] for p in recent) / len(recent)})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args(argv)
    curves: dict[str, list[dict]] = {}
    for number, line in enumerate(args.log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = f"{record['stage']} loss (running mean of {args.window})"
            curves.setdefault(key, []).append({"step": record["step"], "value": float(record["loss"])})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            message = f"{args.log}, line {number}: expected a JSON record with stage, step and loss ({error})"
            raise SystemExit(message) from error
    for key, points in curves.items():  # a resumed run logs some steps twice: keep the last record of each
        by_step = {p["step"]: p for p in points}
        curves[key] = smoothed([by_step[s] for s in sorted(by_step)], args.window)
    plot_curves(curves, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} ({len(v)} points)" for k, v in curves.items()))


if __name__ == "__main__":
    main()
