"""What an evaluation run directory holds, as a key: which weights drew the images, with which sampler and plan.

A table must never mix runs, and a new evaluation must never silently overwrite an earlier report. So every run
directory records `run_key(...)` in its `run.json`: SHA-256 fingerprints of the denoiser (LoRA layers and the active
adapter included) and of the attached soft tokens, the seed, the sampler (scheduler class, steps, guidance, eta) and a
hash of the plan (prompts and images per prompt). [`check_run_dir`] then reuses a finished run with the same key,
and refuses a directory that holds anything else unless asked to overwrite it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch


def _tensors_fingerprint(state: Mapping) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_key(pipe, plan, seed: int, num_inference_steps: int, guidance_scale: float, eta) -> dict:
    """The identity of an evaluation: weights, tokens, sampler, seed and plan (see the module docstring)."""
    from ..injection import injection_of

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    injection = injection_of(pipe) if denoiser is not None else None
    active = getattr(denoiser, "active_adapters", None)
    plan_text = json.dumps([[line, n] for line, n in plan], sort_keys=True)
    return {
        "denoiser": _tensors_fingerprint(denoiser.state_dict()) if denoiser is not None else None,
        "active_adapters": list(active()) if callable(active) and getattr(denoiser, "peft_config", None) else None,
        "soft_tokens": _tensors_fingerprint(injection.soft_tokens.state_dict()) if injection is not None else None,
        "seed": seed,
        "sampler": {
            "scheduler": type(pipe.scheduler).__name__,
            "steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "eta": eta,
        },
        "plan": hashlib.sha256(plan_text.encode()).hexdigest()[:16],
    }


def check_run_dir(out: str | Path, key: Mapping, overwrite: bool = False) -> dict | None:
    """The summary of a finished run in `out` with the same key (nothing to redo), else `None` (go ahead).

    Raises `FileExistsError` when `out` holds an evaluation with another key, or one without a key (written before
    keys existed), unless `overwrite`.
    """
    out = Path(out)
    run_file, summary_file = out / "run.json", out / "summary.json"
    if not (run_file.is_file() or summary_file.is_file() or (out / "results.jsonl").is_file()):
        return None
    try:
        written = json.loads(run_file.read_text(encoding="utf-8")).get("key") if run_file.is_file() else None
    except json.JSONDecodeError:
        written = None
    if written == dict(key) and summary_file.is_file():
        return json.loads(summary_file.read_text(encoding="utf-8"))
    if overwrite:
        return None
    differs = sorted(k for k in key if (written or {}).get(k) != key[k]) if written else ["(no key recorded)"]
    raise FileExistsError(
        f"{out} already holds an evaluation of other weights or settings (differs in: {', '.join(differs)}); "
        "choose another output directory, or overwrite it explicitly (--overwrite / overwrite=True)."
    )
