"""A latent and text-embedding cache on disk: encode each image and caption once, reuse them across runs.

Encoding (VAE and text encoders) dominates the official pipelines' cost; the soft-token step needs only latents and
conditioning. Layout under `cache_dir/<fingerprint>/`:

- `images-<writer>.safetensors`: `latent_mean`, `latent_std` (already shifted and scaled like the pipeline's
  latents; a training step draws `mean + std * noise`, the VAE posterior sample the official code uses);
- `captions-<writer>.safetensors`: the pipeline's conditioning per unique caption (`prompt_embeds`, and for SDXL /
  SD3 `pooled_prompt_embeds`);
- `index.json`: which example key and caption live in which shard (by file name) and row.

The fingerprint hashes the VAE and text-encoder weights, the tokenizers' vocabularies, the family, the resolution,
the crop and (when it is not the pipeline's own) the conditioning layout, so a changed model or preprocessing never
reuses stale entries.

Many runs can share one cache at once. Each encode writes its shards under a name no other writer can take (a random
128-bit token), each to a temporary name of its own first; then, under an exclusive lock on `index.lock`, it reads
the index as it is on disk now, adds its entries (entries another run wrote meanwhile are kept) and replaces
`index.json` through a temporary file of its own. Readers only ever see a whole index whose shards are complete. A
process killed mid-encode leaves at most unreferenced shard files (ignored, and their names never reused), never a
broken index. Indexes of the first format (numbered shards) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_file, atomic_write_text
from .data import Example, preprocess

CACHE_FORMAT = 1


def module_fingerprint(module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pipeline_fingerprint(pipe, family: str, resolution: int, center_crop: bool, layout: str = "stock") -> str:
    """The cache key of a pipeline's encodings: VAE and text-encoder weights, tokenizers, family, preprocessing."""
    parts = {"format": CACHE_FORMAT, "family": family, "resolution": resolution, "center_crop": center_crop}
    if layout != "stock":  # conditioning shaped unlike the pipeline's own (keys of stock layouts stay as they were)
        parts["conditioning_layout"] = layout
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            parts[name] = module_fingerprint(module)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
            parts[name] = hashlib.sha256(f"{vocab}:{tokenizer.model_max_length}".encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class CacheStats:
    """What one `encode` call did: images and captions encoded or reused, and the images skipped."""

    images_encoded: int = 0
    images_reused: int = 0
    captions_encoded: int = 0
    captions_reused: int = 0
    skipped: list[str] = field(default_factory=list)


class EncodedData:
    """Latents and conditioning of every usable example, in memory, indexed like `examples`."""

    def __init__(self, latent_mean, latent_std, caption_rows, conditioning, captions, keys, stats):
        self.latent_mean = latent_mean  # (N, C, h, w)
        self.latent_std = latent_std  # (N, C, h, w)
        self.caption_rows = caption_rows  # (N,) row of each example's caption in `conditioning`
        self.conditioning = conditioning  # name -> (n_captions, ...)
        self.captions = captions  # caption of each example
        self.keys = keys
        self.stats = stats

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def batch(self, indices: torch.Tensor, generator: torch.Generator):
        """Latent samples `mean + std * noise` and conditioning rows of examples `indices`."""
        mean, std = self.latent_mean[indices], self.latent_std[indices]
        latents = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        rows = self.caption_rows[indices]
        return latents, {name: tensor[rows] for name, tensor in self.conditioning.items()}


class EncodingCache:
    """The on-disk cache for one pipeline and preprocessing. See the module docstring for the layout."""

    def __init__(self, cache_dir: str | os.PathLike, pipe, backbone, resolution: int, center_crop: bool):
        self.backbone = backbone
        self.resolution, self.center_crop = resolution, center_crop
        self.fingerprint = pipeline_fingerprint(
            pipe, backbone.family, resolution, center_crop, backbone.conditioning_layout
        )
        self.root = Path(cache_dir) / self.fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self._read_index()

    def _read_index(self) -> dict:
        path = self.root / "index.json"
        if not path.is_file():
            return _empty_index()
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            for kind in ("images", "captions"):
                # The first format numbered shards (`images-00000`); entries now name their shard file.
                index[kind] = {
                    key: [f"{kind}-{row[0]:05d}.safetensors" if isinstance(row[0], int) else str(row[0]), int(row[1])]
                    for key, row in index[kind].items()
                }
                for name in {row[0] for row in index[kind].values()}:
                    if not (self.root / name).is_file():
                        raise ValueError(f"missing {name}")
            return {"format": INDEX_FORMAT, "images": index["images"], "captions": index["captions"]}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            warnings.warn(f"Ignoring the unreadable cache index {path} ({error}); re-encoding.", stacklevel=2)
            return _empty_index()

    def encode(self, examples: list[Example], skip_bad_images: bool = False, batch_size: int = 16) -> EncodedData:
        """Encode what is missing, write it as one new shard, and return every usable example's encodings."""
        stats = CacheStats()
        new_images, new_captions = [], []
        missing_captions = sorted({e.caption for e in examples} - set(self.index["captions"]))
        pending = [e for e in examples if e.key not in self.index["images"] or e.key.startswith("missing:")]
        stats.images_reused = len(examples) - len(pending)
        stats.captions_reused = len({e.caption for e in examples}) - len(missing_captions)
        good: list[Example] = []
        pixels: list[torch.Tensor] = []
        for example in pending:
            try:
                pixels.append(preprocess(example.load(), self.resolution, self.center_crop, example.source))
                good.append(example)
            except (ValueError, FileNotFoundError):
                if not skip_bad_images:
                    raise
                stats.skipped.append(example.source)
        for start in range(0, len(good), batch_size):
            batch = torch.stack(pixels[start : start + batch_size])
            mean, std = self.backbone.encode_image_moments(batch)
            new_images += [(e.key, m, s) for e, m, s in zip(good[start : start + batch_size], mean, std, strict=True)]
        for start in range(0, len(missing_captions), batch_size):
            captions = missing_captions[start : start + batch_size]
            encoded = self.backbone.encode_prompts(captions)
            new_captions += [(c, {k: v[i].cpu() for k, v in encoded.items()}) for i, c in enumerate(captions)]
        stats.images_encoded, stats.captions_encoded = len(new_images), len(new_captions)
        if new_images or new_captions:
            self._write_shard(new_images, new_captions)
        usable = [e for e in examples if e.key in self.index["images"]]
        return self._load(usable, stats)

    def _write_shard(self, images, captions) -> None:
        from safetensors.torch import save_file

        writer = secrets.token_hex(16)  # no other process, run or retry can pick the same shard names
        entries: dict[str, dict] = {"images": {}, "captions": {}}
        if images:
            tensors = {
                "latent_mean": torch.stack([m for _, m, _ in images]).contiguous(),
                "latent_std": torch.stack([s for _, _, s in images]).contiguous(),
            }
            name = f"images-{writer}.safetensors"
            _atomic_save(save_file, tensors, self.root / name)
            entries["images"] = {key: [name, row] for row, (key, _, _) in enumerate(images)}
        if captions:
            names = captions[0][1].keys()
            tensors = {n: torch.stack([c[n] for _, c in captions]).contiguous() for n in names}
            name = f"captions-{writer}.safetensors"
            _atomic_save(save_file, tensors, self.root / name)
            entries["captions"] = {caption: [name, row] for row, (caption, _) in enumerate(captions)}
        with _index_lock(self.root):
            index = self._read_index()  # as it is now: other runs may have added entries since this one read it
            for kind in ("images", "captions"):
                for key, row in entries[kind].items():
                    index[kind].setdefault(key, row)  # an entry already there encodes the same content
            atomic_write_text(self.root / "index.json", json.dumps(index))
        self.index = index

    def _load(self, examples: list[Example], stats: CacheStats) -> EncodedData:
        from safetensors.torch import load_file

        shards: dict[str, dict] = {}

        def shard(name):
            if name not in shards:
                shards[name] = load_file(self.root / name)
            return shards[name]

        if not examples:
            raise ValueError(f"No usable training images ({len(stats.skipped)} skipped as unreadable).")
        means, stds = [], []
        for example in examples:
            name, row = self.index["images"][example.key]
            tensors = shard(name)
            means.append(tensors["latent_mean"][row])
            stds.append(tensors["latent_std"][row])
        captions = sorted({e.caption for e in examples})
        caption_row = {c: i for i, c in enumerate(captions)}
        rows = [self.index["captions"][c] for c in captions]
        names = list(shard(rows[0][0]).keys())
        conditioning = {n: torch.stack([shard(s)[n][r] for s, r in rows]) for n in names}
        return EncodedData(
            latent_mean=torch.stack(means),
            latent_std=torch.stack(stds),
            caption_rows=torch.tensor([caption_row[e.caption] for e in examples]),
            conditioning=conditioning,
            captions=[e.caption for e in examples],
            keys=[e.key for e in examples],
            stats=stats,
        )


INDEX_FORMAT = 2


def _empty_index() -> dict:
    return {"format": INDEX_FORMAT, "images": {}, "captions": {}}


@contextmanager
def _index_lock(root: Path):
    """An exclusive lock on `root/index.lock` between processes (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is then the caller's business
        yield
        return
    with open(root / "index.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_save(save_file, tensors, path: Path) -> None:
    with atomic_file(path) as temp:
        save_file(tensors, str(temp))
