"""Web-like caption noise for pretraining the shapes models: the regime of the papers, with a dial.

Real text-to-image models are pretrained on web alt-text, which often misstates what the image shows: wrong or
missing counts, missing or wrong colours, missing relations, captions that name nothing ("a photo"). They are then
post-trained on a curated caption set. The shapes world reproduces that: pretraining scenes cover *every*
combination (the held-out split included, as the web contains "three cats"), each caption corrupted at recorded
rates by [`CaptionNoise`]; post-training uses only clean captions of the training split (`render_batch`).

The noise model, applied to the clean GenEval-format prompt of the scene (one draw per caption, in this order):
1. generic (`generic`): the whole caption becomes one of [`GENERIC_CAPTIONS`]; nothing else applies;
2. counts (counting scenes): with `count_wrong` the number word becomes another count of 2-5 (uniform) — the
   image shows N objects, the caption says M; else with `count_drop` the number is dropped ("a photo of circles");
3. colours (colors and color_attr scenes), per colour word: with `color_drop` dropped ("a photo of a square"),
   else with `color_swap` replaced by another palette colour (uniform); in color_attr scenes the two colours are
   exchanged between the objects with `binding_swap` first (the caption has the right words, bound wrongly);
4. relations (position scenes): with `relation_drop` "a photo of a A and a B", else with `relation_swap` another
   relation (uniform among the other three);
5. objects (two_object scenes): with `object_drop` only the first object is named.
Every rate is a probability in [0, 1]. `CaptionNoise.at_level(level)` scales the reference rates
[`REFERENCE_NOISE`] by `level` (clipped to 1), the dial for how weak the pretraining alignment is: level 0 is the v1
regime (perfect captions), level 1 the reference, where half the counting captions state a wrong count as in the
first pilot (`shared/PILOTS.md`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .prompts import all_prompts
from .vocabulary import COLORS, NUMBER_WORDS, PLURALS, RELATIONS, TRAIN_COUNTS, article

GENERIC_CAPTIONS = ("a photo", "a photo of some shapes", "shapes", "an image of shapes on white")


@dataclass(frozen=True)
class CaptionNoise:
    """Rates of each caption corruption (probabilities; see the module docstring for the order they apply in)."""

    generic: float = 0.0
    count_wrong: float = 0.0
    count_drop: float = 0.0
    color_drop: float = 0.0
    color_swap: float = 0.0
    binding_swap: float = 0.0
    relation_drop: float = 0.0
    relation_swap: float = 0.0
    object_drop: float = 0.0

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"CaptionNoise.{item.name} must be a probability in [0, 1], got {value!r}.")

    @classmethod
    def at_level(cls, level: float) -> CaptionNoise:
        """[`REFERENCE_NOISE`] with every rate multiplied by `level` (>= 0) and clipped to 1."""
        if level < 0:
            raise ValueError(f"The caption noise level must be >= 0, got {level!r}.")
        return cls(**{name: min(1.0, level * rate) for name, rate in asdict(REFERENCE_NOISE).items()})

    def to_dict(self) -> dict:
        """The rates by name (for model cards)."""
        return asdict(self)


REFERENCE_NOISE = CaptionNoise(
    generic=0.1,
    count_wrong=0.5,
    count_drop=0.2,
    color_drop=0.3,
    color_swap=0.2,
    binding_swap=0.3,
    relation_drop=0.3,
    relation_swap=0.2,
    object_drop=0.1,
)


def _a(word: str) -> str:
    return f"{article(word)} {word}"


def noisy_caption(line: dict, noise: CaptionNoise, rng: np.random.Generator) -> str:
    """A web-like caption of a scene drawn for GenEval metadata `line` (its clean caption is `line["prompt"]`)."""
    if rng.random() < noise.generic:
        return GENERIC_CAPTIONS[int(rng.integers(len(GENERIC_CAPTIONS)))]
    tag, include = line["tag"], line["include"]
    if tag == "counting":
        clause = include[0]
        plural = PLURALS[clause["class"]]
        if rng.random() < noise.count_wrong:
            others = [c for c in TRAIN_COUNTS if c != clause["count"]]
            return f"a photo of {NUMBER_WORDS[others[int(rng.integers(len(others)))]]} {plural}"
        if rng.random() < noise.count_drop:
            return f"a photo of {plural}"
        return line["prompt"]
    if tag in ("colors", "color_attr"):
        colors = [clause["color"] for clause in include]
        if tag == "color_attr" and rng.random() < noise.binding_swap:
            colors = colors[::-1]
        named = [
            f"{_noisy_color(color, noise, rng)} {clause['class']}".strip()
            for color, clause in zip(colors, include, strict=True)
        ]
        return "a photo of " + " and ".join(_a(phrase) for phrase in named)
    if tag == "position":
        other, subject = include[0]["class"], include[1]["class"]
        relation = include[1]["position"][0]
        if rng.random() < noise.relation_drop:
            return f"a photo of {_a(subject)} and {_a(other)}"
        if rng.random() < noise.relation_swap:
            choices = [r for r in RELATIONS if r != relation]
            relation = choices[int(rng.integers(len(choices)))]
        return f"a photo of {_a(subject)} {relation} {_a(other)}"
    if tag == "two_object" and rng.random() < noise.object_drop:
        return f"a photo of {_a(include[0]['class'])}"
    return line["prompt"]


def _noisy_color(color: str, noise: CaptionNoise, rng: np.random.Generator) -> str:
    if rng.random() < noise.color_drop:
        return ""
    if rng.random() < noise.color_swap:
        choices = [c for c in COLORS if c != color]
        return choices[int(rng.integers(len(choices)))]
    return color


def web_lines() -> list[dict]:
    """The metadata lines of web-like pretraining: every prompt of every tag, held-out combinations included."""
    return [line for _, line in all_prompts()]
