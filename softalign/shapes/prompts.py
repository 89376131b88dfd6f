"""Every shapes-world prompt in GenEval's metadata format (as `prompts/create_prompts.py` writes them), and the split.

The held-out split holds combinations that post-training never sees, balanced so every group keeps some (v2 world:
six shapes, six colours; at least 8 held-out prompts for every tag but single_object):
- counting: for each asked count (2, 3, 4), half the shapes (9 prompts);
- two_object: for each first object, two of the five second objects (12);
- colors: for each shape, two of the six colours (12);
- position: for each ordered pair of shapes, one relation (30);
- color_attr: for each ordered pair of shapes, a quarter of the colour pairs (270).
single_object has nothing to combine: its six prompts are both trained on and evaluated (GenEval's sanity tag).
Which members of a group are held out is fixed by an MD5 rank of the prompt, so the split never changes.
Pretraining of the shipped models sees every combination, held-out ones included, under web-like caption noise
(`softalign.shapes.captions`); post-training (stage 1, fine-tuning, RL prompts, preference pairs) sees only the
clean captions of the training split.
"""

from __future__ import annotations

import hashlib
import itertools
import math

from .vocabulary import COLORS, EVAL_COUNTS, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES, TAGS, TRAIN_COUNTS, article

# The share of each group's prompts that is held out (rounded up): see the module docstring.
HELD_OUT_SHARE = {"count": 1 / 2, "two": 2 / 5, "color": 1 / 3, "position": 1 / 4, "color_attr": 1 / 4}


def _line(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    line = {"tag": tag, "include": include}
    if exclude is not None:
        line["exclude"] = exclude
    line["prompt"] = prompt
    return line


def _a(word: str) -> str:
    return f"{article(word)} {word}"


def all_prompts() -> list[tuple[str, dict]]:
    """(group key, metadata line) for every prompt of every tag, training counts included."""
    lines = []
    for shape in SHAPES:
        lines.append(
            (f"single:{shape}", _line("single_object", [{"class": shape, "count": 1}], f"a photo of {_a(shape)}"))
        )
    for a, b in itertools.permutations(SHAPES, 2):
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        lines.append((f"two:{a}", _line("two_object", include, f"a photo of {_a(a)} and {_a(b)}")))
    for count, shape in itertools.product(TRAIN_COUNTS, SHAPES):
        exclude = [{"class": shape, "count": count + 1}]
        prompt = f"a photo of {NUMBER_WORDS[count]} {PLURALS[shape]}"
        lines.append((f"count:{count}", _line("counting", [{"class": shape, "count": count}], prompt, exclude)))
    for shape, color in itertools.product(SHAPES, COLORS):
        include = [{"class": shape, "count": 1, "color": color}]
        lines.append((f"color:{shape}", _line("colors", include, f"a photo of {_a(color)} {shape}")))
    for (a, b), relation in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
        lines.append((f"position:{a}:{b}", _line("position", include, f"a photo of {_a(a)} {relation} {_a(b)}")))
    for (a, b), (ca, cb) in itertools.product(itertools.permutations(SHAPES, 2), itertools.product(COLORS, COLORS)):
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        prompt = f"a photo of {_a(ca)} {a} and {_a(cb)} {b}"
        lines.append((f"color_attr:{a}:{b}", _line("color_attr", include, prompt)))
    return lines


def _rank(prompt: str) -> str:
    return hashlib.md5(prompt.encode("utf-8")).hexdigest()


def _held_out(lines: list[tuple[str, dict]]) -> set[str]:
    groups: dict[str, list[dict]] = {}
    for key, line in lines:
        groups.setdefault(key, []).append(line)
    held = set()
    for key, members in groups.items():
        if key.startswith("single:") or key == "count:5":
            continue  # nothing to combine / a training-only count
        ranked = sorted(members, key=lambda line: _rank(line["prompt"]))
        n_held = math.ceil(len(ranked) * HELD_OUT_SHARE[key.split(":")[0]])
        held.update(line["prompt"] for line in ranked[:n_held])
    return held


def split_prompts(split: str) -> list[dict]:
    """Metadata lines of `split`: `"train"` (training and post-training) or `"heldout"` (evaluation only)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    lines = all_prompts()
    held = _held_out(lines)
    if split == "train":
        return [line for _, line in lines if line["prompt"] not in held]
    return [
        line
        for _, line in lines
        if line["prompt"] in held or (line["tag"] == "single_object")
        if line["tag"] != "counting" or line["include"][0]["count"] in EVAL_COUNTS
    ]


def evaluation_metadata(split: str = "heldout", min_images_per_tag: int = 300) -> list[tuple[dict, int]]:
    """(metadata line, images to draw) so that every tag of `split` gets at least `min_images_per_tag` images.

    GenEval draws 4 images per prompt; the shapes world has few prompts per most tags, so it draws more seeds per
    prompt. A tag with more prompts than `min_images_per_tag` (color_attr has 270) gets one image for each of a fixed
    subset of that many prompts (the first by MD5 rank), so small budgets stay small.
    """
    lines = split_prompts(split)
    if split == "train":
        lines = [line for line in lines if line["tag"] != "counting" or line["include"][0]["count"] in EVAL_COUNTS]
    plan = []
    for tag in TAGS:
        members = [line for line in lines if line["tag"] == tag]
        if len(members) > min_images_per_tag:  # more prompts than images (color_attr): a fixed, spread subset
            members = sorted(members, key=lambda line: _rank(line["prompt"]))[:min_images_per_tag]
        per_prompt = max(1, math.ceil(min_images_per_tag / len(members)))
        plan += [(line, per_prompt) for line in members]
    return plan


def parse_tags(text: str) -> set[str]:
    """`"counting,position"` -> the set of tags; an unknown tag is a `ValueError` that lists the known ones."""
    wanted = set(text.split(","))
    if unknown := wanted - set(TAGS):
        raise ValueError(f"unknown {sorted(unknown)}; the shapes tags are {list(TAGS)}")
    return wanted
