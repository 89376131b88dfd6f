"""GenEval's image folder: generate into it (resumable), read it back with checks, and score it (resumable).

The layout is GenEval's, so its own `evaluate_images.py` can score the same images:

```
<images>/<00000>/metadata.jsonl     one GenEval metadata object (the line of evaluation_metadata.jsonl)
<images>/<00000>/samples/0000.png   the prompt's images; any `\\d+.png` name is read, as GenEval does
```

Generation: image `i` of prompt `p` has its own generator seeded with `seed + 1000 * p + i`, so its initial noise
does not depend on the batch it was drawn in (the pixels can still move by a grey level or two: batched kernels sum
in another order), and an interrupted run that is started again draws only the missing images. Every PNG is written
to a temporary name and renamed, so a file that exists is complete and is kept.

Scoring: each scored image's row is appended to `results.partial.jsonl` as soon as its batch is scored; a run that
is started again skips the images already there. At the end come GenEval's `results.jsonl`, `summary.json` and
`report.md`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..atomic import atomic_file, atomic_write_text
from .metadata import parse_metadata_line, validate_metadata
from .report import markdown_report
from .rules import evaluate_detections
from .summary import read_results_jsonl, result_row, summarize, write_results_jsonl

# GenEval's generation script (`generation/diffusers_generate.py`): 4 images, seed 42, 50 steps, guidance 9.0, at
# the pipeline's default resolution, for SD1.5 and SDXL alike. It has no setting for flow-matching models (SD3);
# for those the preset is diffusers' own defaults.
GENEVAL_PROTOCOL = {"images_per_prompt": 4, "seed": 42, "num_inference_steps": 50, "guidance_scale": 9.0}
FLOW_MATCHING_PROTOCOL = {"images_per_prompt": 4, "seed": 42, "num_inference_steps": 28, "guidance_scale": 7.0}


def geneval_protocol(pipe) -> dict:
    """GenEval's generation settings for `pipe`: [`GENEVAL_PROTOCOL`], or [`FLOW_MATCHING_PROTOCOL`] for a pipeline
    whose scheduler is a flow-matching one (SD3)."""
    flow = "FlowMatch" in type(pipe.scheduler).__name__
    return dict(FLOW_MATCHING_PROTOCOL if flow else GENEVAL_PROTOCOL)


_SAMPLE = re.compile(r"\d+\.png")
PARTIAL = "results.partial.jsonl"


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_file(path) as temp:
        image.save(temp, format="PNG")


def _write_metadata(folder: Path, metadata: dict) -> None:
    path = folder / "metadata.jsonl"
    text = json.dumps(metadata) + "\n"
    if path.is_file():
        if json.loads(path.read_text(encoding="utf-8") or "null") != metadata:
            raise ValueError(
                f"{path} holds another prompt's metadata than {metadata['prompt']!r}; the folder was written for "
                "another metadata file (use a new output directory)"
            )
        return
    atomic_write_text(path, text)


def generate_geneval_folder(
    pipe,
    metadata: list[dict],
    images_dir: str | os.PathLike,
    images_per_prompt: int = 4,
    seed: int = 42,
    num_inference_steps: int = 50,
    guidance_scale: float = 9.0,
    batch_size: int = 8,
    eta: float | None = None,
    progress: bool = True,
    geneval: bool = True,
) -> dict:
    """Draw the images of every metadata line into GenEval's layout; images already there are kept, not redrawn.

    Args:
        pipe: a diffusers text-to-image pipeline (soft tokens or LoRA already loaded).
        metadata (`list[dict]`): GenEval metadata lines, e.g. [`load_metadata`] of its `evaluation_metadata.jsonl`.
        images_dir (`str` or `os.PathLike`): the folder to fill.
        images_per_prompt, seed, num_inference_steps, guidance_scale: the protocol ([`GENEVAL_PROTOCOL`]).
        batch_size (`int`, *optional*, defaults to 8): images per pipeline call.
        eta (`float`, *optional*): DDIM's eta, for DDIM pipelines.
        progress (`bool`, *optional*): show a progress bar.
        geneval (`bool`, *optional*, defaults to `True`): check every line as GenEval metadata; `False` for caption
            prompts (`{"prompt": caption}`, the COCO protocol), scored by reward metrics only.

    Returns:
        `dict`: `written` and `kept` image counts, and the run settings.
    """
    from tqdm.auto import tqdm

    from ..backbones import collapsed_generation

    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be a positive integer, got {images_per_prompt!r}")
    root = Path(images_dir)
    jobs = []
    for p, line in enumerate(metadata):
        _check_line(line, f"metadata[{p}]", geneval)
        folder = root / f"{p:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        _write_metadata(folder, line)
        for i in range(images_per_prompt):
            path = folder / "samples" / f"{i:04d}.png"
            if not path.is_file():
                jobs.append((p, i, line, path))
    total = len(metadata) * images_per_prompt
    options = {} if eta is None else {"eta": float(eta)}
    started = time.time()
    bar = tqdm(total=total, initial=total - len(jobs), desc="generating", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + 1000 * p + i) for p, i, _, _ in batch]
        with torch.no_grad(), collapsed_generation(pipe) as faster:
            images = pipe(
                [line["prompt"] for _, _, line, _ in batch],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                **options,
                **faster,
            ).images
        for (_, _, _, path), image in zip(batch, images, strict=True):
            _save_png(image, path)
        bar.update(len(batch))
    bar.close()
    return {
        "written": len(jobs),
        "kept": total - len(jobs),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "eta": eta,
        "sampler": type(pipe.scheduler).__name__,
        "generation_seconds": round(time.time() - started, 1),
    }


def _check_line(line, where: str, geneval: bool) -> dict:
    if geneval:
        return validate_metadata(line, source=where)
    if not isinstance(line, dict) or not isinstance(line.get("prompt"), str) or not line["prompt"].strip():
        raise ValueError(f"{where}: expected an object with a non-empty 'prompt' string, got {line!r}")
    return line


def read_geneval_folder(images_dir: str | os.PathLike, geneval: bool = True) -> list[tuple[dict, list[Path]]]:
    """The prompts of a GenEval-layout folder: `(metadata, sorted sample paths)` per numbered subfolder, in number
    order. Subfolders whose name is not a number are skipped, as GenEval does. With `geneval=False` a metadata
    line only needs a `prompt` (caption folders of the COCO protocol).

    Raises:
        `FileNotFoundError` / `ValueError`: not GenEval's layout, naming the folder or file and what was expected.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory; expected GenEval's layout <00000>/metadata.jsonl, samples/"
        )
    numbered = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not numbered:
        found = sorted(p.name for p in root.iterdir())[:8]
        raise ValueError(
            f"{root} has no numbered prompt folders (found {found}); expected GenEval's layout "
            "<00000>/metadata.jsonl and <00000>/samples/<0000>.png"
        )
    prompts = []
    for folder in numbered:
        path = folder / "metadata.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; each prompt folder of GenEval's layout needs its metadata.jsonl"
            )
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(f"{path}: expected one JSON metadata object, got {len(lines)} non-blank lines")
        if geneval:
            metadata = parse_metadata_line(lines[0], source=str(path), line=1)
        else:
            try:
                metadata = _check_line(json.loads(lines[0]), f"{path}, line 1", geneval=False)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line 1: broken JSON ({error.msg} at column {error.colno})") from None
        samples = folder / "samples"
        if not samples.is_dir():
            raise FileNotFoundError(f"{samples} is missing; expected the prompt's images as samples/<0000>.png")
        images = sorted(
            (p for p in samples.iterdir() if p.is_file() and _SAMPLE.fullmatch(p.name)), key=lambda p: p.name
        )
        prompts.append((metadata, images))
    if not any(images for _, images in prompts):
        raise ValueError(f"{root}: no images; expected samples/<0000>.png in the prompt folders")
    return prompts


def _load(path: Path) -> Image.Image:
    with Image.open(path) as opened:  # GenEval reads with EXIF orientation applied
        return ImageOps.exif_transpose(opened).convert("RGB")


def _read_partial(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:  # a row cut by an interruption: score that image again
            break
    return rows


def score_geneval_folder(
    images_dir: str | os.PathLike,
    detector,
    out: str | os.PathLike,
    color_classifier=None,
    batch_size: int = 8,
    title: str = "GenEval rules",
    progress: bool = True,
) -> dict:
    """Score every image of a GenEval-layout folder with GenEval's rules and write the results into `out`.

    Args:
        images_dir (`str` or `os.PathLike`): the folder ([`read_geneval_folder`]).
        detector: a [`Detector`]; one with `detect(images)` (e.g. [`Mask2FormerDetector`]) is called per batch.
        out (`str` or `os.PathLike`): where `results.jsonl`, `summary.json` and `report.md` go.
        color_classifier (`ColorClassifier`, *optional*): for colour clauses (e.g. [`CLIPColorClassifier`]).
        batch_size (`int`, *optional*, defaults to 8): images per detector call.
        title (`str`, *optional*): the report's title; name the detector in it.
        progress (`bool`, *optional*): show a progress bar.

    Returns:
        `dict`: the [`summarize`] summary.
    """
    from tqdm.auto import tqdm

    prompts = read_geneval_folder(images_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(images_dir)
    partial = out / PARTIAL
    rows = _read_partial(partial)
    done = {row["filename"] for row in rows}
    with partial.open("w", encoding="utf-8") as handle:  # rewritten without a cut last row, then appended
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    jobs = [
        (metadata, path, os.path.join(str(root), path.parent.parent.name, "samples", path.name))
        for metadata, paths in prompts
        for path in paths
    ]
    jobs = [job for job in jobs if job[2] not in done]
    total = sum(len(paths) for _, paths in prompts)
    bar = tqdm(total=total, initial=total - len(jobs), desc="scoring", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        images = [_load(path) for _, path, _ in batch]
        if hasattr(detector, "detect"):
            detections = detector.detect(images)
        else:
            detections = [detector(image) for image in images]
        new_rows = []
        for (metadata, _, filename), image, found in zip(batch, images, detections, strict=True):
            correct, reason, details = evaluate_detections(found, metadata, color_classifier, image)
            new_rows.append(result_row(filename, metadata, correct, reason, details))
        with partial.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in new_rows)
            handle.flush()
            os.fsync(handle.fileno())
        rows += new_rows
        bar.update(len(batch))
    bar.close()
    order = {job_name: k for k, job_name in enumerate(_all_filenames(root, prompts))}
    rows.sort(key=lambda row: order.get(row["filename"], len(order)))
    write_results_jsonl(rows, out / "results.jsonl")
    rows = read_results_jsonl(out / "results.jsonl")
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown_report(rows, title=title), encoding="utf-8")
    partial.unlink()
    return summary


def _all_filenames(root: Path, prompts) -> list[str]:
    return [
        os.path.join(str(root), path.parent.parent.name, "samples", path.name) for _, paths in prompts for path in paths
    ]
