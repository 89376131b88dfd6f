"""What the benchmarks share: peak memory, timers, one variant per subprocess, the ratio table.

Every benchmark compares implementations in one run, as ratios, each variant in its own process (so that its peak
memory is its own and no variant warms a cache for another), repeats interleaved so drift hits all alike.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

# Quiet workers: no progress bars or load-report lines between the tables (set before diffusers / tqdm load). Not
# when the tests import these helpers: the test process's logging must stay as the other tests expect it.
if "pytest" not in sys.modules:
    for _name, _value in (("TQDM_DISABLE", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(_name, _value)


# UNet sizes of the SD1.5 class (`UNet2DConditionModel` + CLIP text encoder, random weights): "tiny" is the test
# pipeline, "sd15" the real SD1.5 UNet configuration (860M parameters; the text encoder stays 2 layers wide 768).
SD15_SIZES = {
    "tiny": {},
    "small": dict(block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=64, norm_num_groups=8),
    "medium": dict(
        block_out_channels=(64, 128),
        attention_head_dim=8,
        cross_attention_dim=128,
        norm_num_groups=16,
        layers_per_block=2,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
}


def sd15_pipeline(size: str, resolution: int, seed: int = 0):
    """A seeded random `StableDiffusionPipeline` with the UNet of `SD15_SIZES[size]` for `resolution`-pixel images
    (the tiny VAE downsamples by 2, so latents are `resolution // 2`)."""
    from softalign.testing import tiny_pipeline

    return tiny_pipeline("sd15", seed=seed, sample_size=resolution // 2, **SD15_SIZES[size])


def unet_mb(unet) -> float:
    """The UNet's own parameters and buffers in MiB (LoRA tensors left out): what one more copy of it costs."""
    tensors = [p for n, p in unet.named_parameters() if "lora_" not in n] + list(unet.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def sync(device: str) -> None:
    """Wait for queued CUDA work, so a timer reads finished work (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Wall and CPU seconds of a block; `sync`s the device at both ends."""

    def __init__(self, device: str = "cpu"):
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self):
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def timed_method(obj, name: str, timer: Timer) -> None:
    """Replace `obj.name` by a wrapper that adds each call's time to `timer` (to split an epoch into its phases
    without re-implementing the trainer's loop)."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        with timer:
            return method(*args, **kwargs)

    setattr(obj, name, wrapper)


class RSSSampler:
    """Peak resident memory while the block runs, sampled every millisecond from /proc (CPU runs)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_bytes() -> int:
        """The process's resident set size now."""
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_bytes())


class PeakMemory:
    """Peak memory of the block in MiB above what the process held when it began: CUDA `max_memory_allocated`, or
    peak RSS on CPU (tracemalloc cannot see torch's allocator). Start it before the models are built to count them."""

    def __init__(self, device: str):
        self.device, self.mb = str(device), 0.0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = RSSSampler.rss_bytes()
            self._sampler = RSSSampler().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._sampler.__exit__(*exc)
            self.mb = (self._sampler.peak - self._base) / 2**20


def run_worker(script: str, worker_args: list[str], common_args: list[str], threads: int) -> dict:
    """Run `script --worker ...` in a fresh process and return the JSON dict of its last stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, script, "--worker", *worker_args, *common_args]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"worker {worker_args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def interleaved(variants: list[str], repeats: int, run) -> dict[str, list[dict]]:
    """`run(variant)` for every variant, `repeats` rounds, variants interleaved within each round."""
    results = {v: [] for v in variants}
    for round_ in range(repeats):
        for variant in variants:
            print(f"  round {round_ + 1}/{repeats}: {variant}", file=sys.stderr, flush=True)
            results[variant].append(run(variant))
    return results


def median_of(runs: list[dict], key: str) -> float:
    """The median of `key` over the repeats of one variant."""
    return statistics.median(r[key] for r in runs)


def ratio_table(columns: list[tuple[str, str, str]], medians: dict[str, dict], reference: str) -> str:
    """A markdown table, one row per variant, each metric followed by its ratio to `reference`.

    Args:
        columns: `(key, header, format)` per metric, e.g. `("images_per_s", "images/s", ".2f")`.
        medians: `{variant: {key: value}}`.
        reference: the variant ratios are taken against.
    """
    header = ["variant"] + [f"{h} | x {reference}" for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:|---:" * len(columns) + "|"]
    for variant, values in medians.items():
        cells = [variant]
        for key, _, fmt in columns:
            ref = medians[reference][key]
            cells += [format(values[key], fmt), f"{values[key] / ref:.2f}" if ref else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    """Write the results as JSON (with the machine and torch version) when `--json` was given."""
    if not path:
        return
    import platform

    payload = {**payload, "machine": platform.platform(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
