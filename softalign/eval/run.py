"""Generate images for GenEval metadata with a pipeline, score them with a detector, and write the run directory.

Layout of `out/` (GenEval's, plus reports):
- `images/<prompt 00000>/metadata.jsonl` and `images/<prompt>/samples/<0000>.png`;
- `results.jsonl` (GenEval's columns), `summary.json`, `report.md`, `grid.png`, `run.json` (seeds, sampler, times);
- while it runs, `progress.json` and `results.partial.jsonl`: a killed run continues after its last whole batch
  (`softalign.eval.partial`).

Every image has its own generator seeded with `seed + 1000 * prompt index + image index`, so an image does not
depend on the batch it was drawn in, and two runs (base, after a stage) see the same initial noise per image.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..families import collapsed_generation
from .partial import PartialResults
from .report import caption, markdown_report, save_grid
from .rules import evaluate_detections
from .run_key import check_run_dir, run_key
from .summary import result_row, summarize, write_results_jsonl


def run_evaluation(
    pipe,
    plan: list[tuple[dict, int]],
    detector,
    out: str | os.PathLike,
    seed: int = 42,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    eta: float | None = None,
    batch_size: int = 32,
    grid_prompts: int = 12,
    grid_images: int = 4,
    title: str = "GenEval results",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Draw `n` images for each `(metadata, n)` of `plan`, score them, and write the run directory.

    `eta` (DDIM pipelines only; `None`: the pipeline's default, deterministic DDIM) samples with DDIM's noise, e.g.
    `eta=1.0` to score a DDPO policy with the sampler it was trained with.

    The run is keyed ([`run_key`]: weights, tokens, sampler, seed, plan): a finished run in `out` with the same key is
    returned as it is, and a directory holding another evaluation is refused unless `overwrite`.

    Returns:
        `dict`: the [`summarize`] summary (also in `summary.json`).
    """
    from tqdm.auto import tqdm

    key = run_key(pipe, plan, seed, num_inference_steps, guidance_scale, eta)
    finished = check_run_dir(out, key, overwrite)
    if finished is not None:
        print(f"{out}: already evaluated with the same weights, sampler, seed and prompts; reusing it")
        return finished

    sampler_options = {} if eta is None else {"eta": _checked_eta(pipe, eta)}
    out = Path(out)
    so_far = PartialResults(out, key, batch_size, overwrite)  # a killed run's finished batches
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(p, i, metadata) for p, (metadata, n) in enumerate(plan) for i in range(n)]
    rows, started, cpu_started = list(so_far.rows), time.time(), time.process_time()
    bar = tqdm(total=len(jobs), initial=len(rows), desc="evaluating", disable=not progress, dynamic_ncols=True)
    for start in range(len(rows), len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + 1000 * p + i) for p, i, _ in batch]
        # SD3 without T5: the same images, one zero row instead of 256
        with torch.no_grad(), collapsed_generation(pipe) as faster:
            images = pipe(
                [metadata["prompt"] for _, _, metadata in batch],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                **sampler_options,
                **faster,
            ).images
        for (p, i, metadata), image in zip(batch, images, strict=True):
            folder = out / "images" / f"{p:05d}"
            if i == 0:
                (folder / "samples").mkdir(parents=True, exist_ok=True)
                (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n", encoding="utf-8")
            filename = folder / "samples" / f"{i:04d}.png"
            image.save(filename)
            correct, reason, details = evaluate_detections(detector(image), metadata)
            rows.append(
                result_row(
                    str(filename.relative_to(out)),
                    metadata,
                    correct,
                    reason,
                    json.loads(details) if isinstance(details, str) else details,
                )
            )
        so_far.append(rows[-len(batch) :])
        bar.update(len(batch))
    bar.close()
    write_results_jsonl(rows, out / "results.jsonl")
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown_report(rows, title=title), encoding="utf-8")
    _grid(out, plan, rows, grid_prompts, grid_images)
    run = {
        "key": key,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "sampler": type(pipe.scheduler).__name__,
        "eta": eta,
        "images": len(rows),
        "prompts": len(plan),
        "resumed_after": len(so_far.rows),  # images a killed run had finished (the times below leave them out)
        "wall_seconds": round(time.time() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    so_far.finish()
    return summary


def _checked_eta(pipe, eta: float) -> float:
    """`eta` if `pipe` samples with DDIM, else a `ValueError` naming the pipeline and its scheduler (diffusers' other
    schedulers would drop `eta` without a word)."""
    import inspect

    if not all("eta" in inspect.signature(call).parameters for call in (pipe.__call__, pipe.scheduler.step)):
        raise ValueError(
            f"eta={eta} needs a pipeline that samples with DDIM; {type(pipe).__name__} samples with "
            f"{type(pipe.scheduler).__name__}, which has no eta."
        )
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}.")
    return float(eta)


def _grid(out: Path, plan, rows, n_prompts: int, n_images: int) -> None:
    """A fixed selection (the first prompts of every tag, the first images of each) with verdicts underneath."""
    by_file = {row["filename"]: row for row in rows}
    tags = list(dict.fromkeys(metadata["tag"] for metadata, _ in plan))
    per_tag = max(1, n_prompts // max(1, len(tags)))
    chosen = []
    for tag in tags:
        chosen += [p for p, (metadata, _) in enumerate(plan) if metadata["tag"] == tag][:per_tag]
    images, captions = [], []
    for p in chosen:
        for i in range(min(n_images, plan[p][1])):
            name = f"images/{p:05d}/samples/{i:04d}.png"
            images.append(out / name)
            captions.append(f"{plan[p][0]['prompt']}\n{caption(by_file[name])}")
    if images:
        save_grid(images, captions, out / "grid.png", columns=n_images, font_size=10)
