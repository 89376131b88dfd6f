"""Image-caption data for the SoftAlign stage: a folder with `metadata.jsonl`, a `datasets.Dataset`, or any iterable.

Every source becomes a list of [`Example`]s: a content key (for the cache), a caption and a way to load the image.
Images are read lazily, converted to RGB, resized and centre-cropped to the training resolution.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_CAPTION_CHARS = 2000
MIN_IMAGE_SIDE = 8


@dataclass(frozen=True)
class Example:
    """One image-caption pair. `key` identifies its content (path, size and mtime, or a hash of the bytes)."""

    key: str
    caption: str
    load: Callable[[], Image.Image]
    source: str  # what to name in errors: a file path or "item 17"


def check_caption(caption, source: str) -> str:
    """`caption` if it is a non-empty string of at most `MAX_CAPTION_CHARS` characters, else a `ValueError` naming `source`."""
    if not isinstance(caption, str):
        raise ValueError(f"{source}: the caption must be a string, got {type(caption).__name__}.")
    if not caption.strip():
        raise ValueError(f"{source}: the caption is empty.")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"{source}: the caption has {len(caption)} characters, more than {MAX_CAPTION_CHARS}.")
    return caption


def image_folder(root: str | os.PathLike) -> list[Example]:
    """Examples of a folder in the Hugging Face image-folder layout: images plus `metadata.jsonl` lines
    `{"file_name": "0001.png", "text": "a red circle"}`."""
    root = Path(root)
    metadata = root / "metadata.jsonl"
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    if not metadata.is_file():
        raise FileNotFoundError(f"{root} has no metadata.jsonl (lines of {{'file_name': ..., 'text': ...}}).")
    examples = []
    try:
        text = metadata.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{metadata} is not UTF-8 text: {error}") from error
    # split at newlines only: str.splitlines() also splits at U+2028 and friends, which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{metadata}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}).") from error
        except RecursionError as error:
            raise ValueError(f"{where}: JSON nested too deeply.") from error
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where}: expected an object with 'file_name' and 'text', got {found}.")
        name = row["file_name"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'file_name' must be a non-empty string, got {name!r}.")
        path = root / name
        inside = os.path.abspath(root)  # string operations only: names that cannot exist still parse
        if os.path.commonpath([inside, os.path.abspath(path)]) != inside or os.path.abspath(path) == inside:
            raise ValueError(f"{where}: 'file_name' {name!r} points outside the image folder {root}.")
        caption = check_caption(row["text"], where)
        stat = path.stat() if path.is_file() else None
        key = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"missing:{path}"
        examples.append(Example(key, caption, _file_loader(path), str(path)))
    if not examples:
        raise ValueError(f"{metadata} lists no images.")
    return examples


def hf_dataset(dataset, image_column: str = "image", caption_column: str = "text") -> list[Example]:
    """Examples of a `datasets.Dataset` whose rows hold a PIL image (or a path) and a caption."""
    for column in (image_column, caption_column):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has columns {dataset.column_names}; expected a {column!r} column.")
    return iterable_examples(
        ((dataset[i][image_column], dataset[i][caption_column]) for i in range(len(dataset))), name="dataset row"
    )


def iterable_examples(items: Iterable, name: str = "item") -> list[Example]:
    """Examples of an iterable of `(image, caption)` pairs or `{"image": ..., "text": ...}` dicts; an image is a PIL
    image, a path, or encoded bytes."""
    examples = []
    for index, item in enumerate(items):
        source = f"{name} {index}"
        if isinstance(item, dict):
            if "image" not in item or "text" not in item:
                raise ValueError(f"{source}: expected keys 'image' and 'text', got {sorted(item)}.")
            image, caption = item["image"], item["text"]
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            image, caption = item
        else:
            raise ValueError(f"{source}: expected an (image, caption) pair or a dict, got {type(item).__name__}.")
        check_caption(caption, source)
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            stat = path.stat() if path.is_file() else None
            key = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"missing:{path}"
            examples.append(Example(key, caption, _file_loader(path), str(path)))
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
            key = "bytes:" + hashlib.sha256(data).hexdigest()
            examples.append(Example(key, caption, _bytes_loader(data, source), source))
        elif isinstance(image, Image.Image):
            key = (
                "pixels:" + hashlib.sha256(image.tobytes() + image.mode.encode() + str(image.size).encode()).hexdigest()
            )
            examples.append(Example(key, caption, (lambda im=image: im), source))
        else:
            raise ValueError(f"{source}: the image must be a PIL image, a path or bytes, got {type(image).__name__}.")
    if not examples:
        raise ValueError("The training data is empty.")
    return examples


def as_examples(data) -> list[Example]:
    """Turn any supported source (folder path, `datasets.Dataset`, list of `Example`s, iterable) into examples."""
    if isinstance(data, (str, os.PathLike)):
        return image_folder(data)
    if isinstance(data, list) and data and all(isinstance(e, Example) for e in data):
        return data
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):
        return hf_dataset(data)
    return iterable_examples(data)


def _file_loader(path: Path):
    def load() -> Image.Image:
        if not path.is_file():
            raise FileNotFoundError(f"Image not found: {path}")
        try:
            with Image.open(path) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{path} is not a readable image (corrupt or truncated): {error}") from error

    return load


def _bytes_loader(data: bytes, source: str):
    def load() -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{source} is not a readable image (corrupt or truncated): {error}") from error

    return load


def to_8bit_rgb(image: Image.Image, source: str) -> Image.Image:
    """RGB with 8 bits per channel: greyscale, palette, RGBA (onto black) and CMYK convert directly; 16-bit and 32-bit
    integer images are rescaled from their full range and float images from [0, 1] (PIL's convert would clip them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else float(2**31 - 1)
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{source} holds NaN or infinite pixel values.")
        return Image.fromarray(np.clip(array * 255.0, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, resolution: int, center_crop: bool, source: str) -> torch.Tensor:
    """RGB float tensor `(3, resolution, resolution)` in [-1, 1]: resize the short side, then centre-crop
    (`center_crop=True`), or resize to a square ignoring the aspect ratio."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"{source} is {image.size[0]}x{image.size[1]} pixels; images need at least {MIN_IMAGE_SIDE}.")
    image = to_8bit_rgb(image, source)
    if center_crop:
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    else:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# -- groups of candidates ---------------------------------------------------------------------------------------------
def shared_caption_warning(caption_rows: list[int], group: int, keep_groups: bool) -> str | None:
    """What to tell a user whose examples share captions (`None` when every caption is distinct).

    A negative with the image's own caption cannot be told apart from the positive, so such a pair is never won
    (win rate 0 for it). The official codes draw each image's negatives from its batch as it comes, with that flaw.

    Args:
        caption_rows (`list[int]`): the caption id of each example.
        group (`int`): `negatives_per_positive + 1`.
        keep_groups (`bool`): whether the dataset's consecutive groups are kept as given.
    """
    distinct = len(set(caption_rows))
    if distinct == len(caption_rows):
        return None
    if keep_groups:
        groups = [caption_rows[i : i + group] for i in range(0, len(caption_rows) - group + 1, group)]
        bad = sum(len(set(g)) < len(g) for g in groups)
        remedy = f"keep_groups is on, so the dataset's groups are used as given: {bad} of {len(groups)} hold a repeated caption"
    elif distinct < group:
        remedy = (
            f"only {distinct} distinct captions for groups of {group} (negatives_per_positive + 1), so some negatives "
            "must repeat their image's caption; add captions or lower negatives_per_positive"
        )
    else:
        remedy = "negatives are drawn from captions that differ from the image's own where possible"
    return (
        f"{len(caption_rows) - distinct} of {len(caption_rows)} examples repeat another example's caption ({distinct} "
        f"distinct captions); a negative with the image's own caption cannot be told apart from the positive (win "
        f"rate 0 for it); {remedy}."
    )


def distinct_caption_order(order: torch.Tensor, caption_rows: torch.Tensor, group: int) -> torch.Tensor:
    """`order` (a permutation of the examples) rearranged so that each consecutive group of `group` examples has
    distinct captions wherever the data allow it; unchanged when every caption is distinct.

    Each group takes one example of each of the `group` captions with the most examples left (ties: the caption whose
    next example comes first in `order`), each caption's examples in their order; so with distinct captions the groups
    are `order` cut as it comes, and repeated captions are spread before they can pile up at the end. A group that
    cannot be completed with distinct captions (too few left) is filled with the next examples as they come.
    """
    import heapq
    from collections import deque

    caption_of = caption_rows.tolist()
    if len(set(caption_of)) == len(caption_of):
        return order
    ranked = order.tolist()
    position = {index: rank for rank, index in enumerate(ranked)}
    queues: dict[int, deque] = {}
    for index in ranked:
        queues.setdefault(caption_of[index], deque()).append(index)
    heap = [(-len(q), position[q[0]], caption) for caption, q in queues.items()]
    heapq.heapify(heap)
    arranged = []
    while heap:
        captions = [heapq.heappop(heap)[2] for _ in range(min(group, len(heap)))]  # distinct: one entry each
        members = [queues[caption].popleft() for caption in captions]
        if len(members) < group:  # fewer distinct captions left than a group holds
            rest = sorted((i for c in captions for i in queues[c]), key=position.__getitem__)[: group - len(members)]
            for index in rest:
                queues[caption_of[index]].remove(index)
            members += rest
        arranged += sorted(members, key=position.__getitem__)
        for caption in captions:
            if queues[caption]:
                heapq.heappush(heap, (-len(queues[caption]), position[queues[caption][0]], caption))
    return torch.tensor(arranged, dtype=order.dtype)
