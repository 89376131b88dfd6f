"""Child process of the cache-sharing tests: encode one shapes dataset into a shared cache, save what it got.

    python tests/cache_writer.py CACHE_DIR SEED OUT.pt [--barrier DIR --parties N] [--die-before-index]

`--barrier` lines N writers up: each, once built, leaves a file in DIR and waits until all N have; `--die-before-index` SIGKILLs the process after its
shards are written and while it holds the index lock, before the index is replaced (the worst moment to die).
"""

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes_data import shapes_pairs  # noqa: E402

import softalign.cache  # noqa: E402
from softalign.softalign_config import SoftAlignConfig  # noqa: E402
from softalign.softalign_trainer import SoftAlignTrainer  # noqa: E402
from softalign.testing import tiny_pipeline  # noqa: E402


def encode(cache_dir: str, seed: int, barrier=None):
    """The encodings of dataset `seed` through a cache in `cache_dir`, on one thread (so every process computes
    the same bits: the VAE's convolutions sum in another order on two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _encode(cache_dir, seed, barrier)
    finally:
        torch.set_num_threads(threads)


def _encode(cache_dir: str, seed: int, barrier):
    with tempfile.TemporaryDirectory() as run:
        config = SoftAlignConfig(output_dir=run, max_steps=1, resolution=32, cache_dir=cache_dir)
        trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config, shapes_pairs(n=24, seed=seed))
        if barrier is not None:  # everything is built: the writers read and write the cache together
            barrier()
        data = trainer.prepare_data()
    return {
        "latent_mean": data.latent_mean,
        "latent_std": data.latent_std,
        **{f"conditioning.{k}": v[data.caption_rows] for k, v in data.conditioning.items()},
        "images_encoded": torch.tensor(data.stats.images_encoded),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir")
    parser.add_argument("seed", type=int)
    parser.add_argument("out")
    parser.add_argument("--barrier", type=Path)
    parser.add_argument("--parties", type=int, default=1)
    parser.add_argument("--die-before-index", action="store_true")
    args = parser.parse_args()
    if args.die_before_index:

        def die(path, text):
            Path(str(path) + ".partial.tmp").write_text(text[: len(text) // 2])  # a half-written file left behind
            os.kill(os.getpid(), signal.SIGKILL)

        softalign.cache.atomic_write_text = die

    def barrier():
        args.barrier.mkdir(parents=True, exist_ok=True)
        (args.barrier / f"ready-{args.seed}").touch()
        while len(list(args.barrier.glob("ready-*"))) < args.parties:
            time.sleep(0.001)

    torch.save(encode(args.cache_dir, args.seed, barrier if args.barrier else None), args.out)


if __name__ == "__main__":
    main()
