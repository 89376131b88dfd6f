"""The v2 shapes world: vocabulary, split sizes, the web-like caption noise model and its dial."""

import re
from collections import Counter

import numpy as np
import pytest

from softalign.shapes.captions import GENERIC_CAPTIONS, REFERENCE_NOISE, CaptionNoise, noisy_caption, web_lines
from softalign.shapes.data import render_batch
from softalign.shapes.prompts import evaluation_metadata, split_prompts
from softalign.shapes.vocabulary import COLORS, NUMBER_WORDS, SHAPES, TAGS


def test_vocabulary_has_six_shapes_and_six_colours():
    assert len(SHAPES) >= 6 and len(COLORS) >= 6


def test_every_tag_but_single_object_has_eight_held_out_prompts_never_trained_on():
    held, train = split_prompts("heldout"), split_prompts("train")
    per_tag = Counter(line["tag"] for line in held)
    assert all(per_tag[tag] >= 8 for tag in TAGS if tag != "single_object"), per_tag
    assert per_tag["single_object"] == len(SHAPES)
    train_prompts = {line["prompt"] for line in train}
    shared = {line["prompt"] for line in held} & train_prompts
    assert {line["tag"] for line in held if line["prompt"] in shared} == {"single_object"}
    counts = {line["include"][0]["count"] for line in held if line["tag"] == "counting"}
    assert counts == {2, 3, 4}  # GenEval's counts; five is trained on only


def test_split_is_fixed():
    held = {line["prompt"] for line in split_prompts("heldout")}
    # Pinned: the MD5 rank chooses these; a change would silently change every table.
    assert {"a photo of two circles", "a photo of three hearts", "a photo of four crosses"} <= held
    assert "a photo of two squares" not in held


def test_evaluation_plan_gives_every_tag_300_images():
    per_tag = Counter()
    for line, n in evaluation_metadata():
        per_tag[line["tag"]] += n
    assert all(per_tag[tag] >= 300 for tag in TAGS), per_tag


def test_web_lines_cover_every_combination_held_out_included():
    web = {line["prompt"] for line in web_lines()}
    assert {line["prompt"] for line in split_prompts("heldout")} <= web
    assert {line["prompt"] for line in split_prompts("train")} <= web


def _draw(tag: str, noise: CaptionNoise, n: int = 4000, seed: int = 0) -> list[tuple[dict, str]]:
    rng = np.random.default_rng(seed)
    lines = [line for line in web_lines() if line["tag"] == tag]
    drawn = []
    for _ in range(n):
        line = lines[int(rng.integers(len(lines)))]
        drawn.append((line, noisy_caption(line, noise, rng)))
    return drawn


def _share(pairs, predicate) -> float:
    return sum(predicate(line, caption) for line, caption in pairs) / len(pairs)


def test_count_noise_happens_at_its_recorded_rates():
    noise = CaptionNoise(count_wrong=0.4, count_drop=0.5)
    pairs = _draw("counting", noise)

    def stated(caption):
        words = caption.split()
        return next((k for k, w in NUMBER_WORDS.items() if w in words), None)

    wrong = _share(pairs, lambda line, c: stated(c) not in (None, line["include"][0]["count"]))
    dropped = _share(pairs, lambda line, c: stated(c) is None)
    assert wrong == pytest.approx(0.4, abs=0.03)
    assert dropped == pytest.approx(0.6 * 0.5, abs=0.03)  # drop applies to the captions whose count was kept
    assert all(c.startswith("a photo of ") for _, c in pairs)


def test_colour_relation_object_and_generic_noise_rates():
    colors = _draw("colors", CaptionNoise(color_drop=0.25, color_swap=0.2))
    dropped = _share(colors, lambda line, c: not any(name in c.split() for name in COLORS))
    swapped = _share(
        colors, lambda line, c: any(n in c.split() for n in COLORS) and line["include"][0]["color"] not in c
    )
    assert dropped == pytest.approx(0.25, abs=0.03) and swapped == pytest.approx(0.75 * 0.2, abs=0.03)
    binding = _draw("color_attr", CaptionNoise(binding_swap=1.0))
    assert all(c == _swapped(line) for line, c in binding)
    position = _draw("position", CaptionNoise(relation_drop=0.3))
    assert _share(position, lambda line, c: " and " in c) == pytest.approx(0.3, abs=0.03)
    two = _draw("two_object", CaptionNoise(object_drop=0.5))
    assert _share(two, lambda line, c: " and " not in c) == pytest.approx(0.5, abs=0.03)
    generic = _draw("counting", CaptionNoise(generic=0.3))
    assert _share(generic, lambda line, c: c in GENERIC_CAPTIONS) == pytest.approx(0.3, abs=0.03)


def _swapped(line: dict) -> str:
    (a, b) = line["include"]
    text = f"a photo of {_an(b['color'])} {a['class']} and {_an(a['color'])} {b['class']}"
    return text


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def test_level_zero_is_clean_and_the_dial_scales_the_reference():
    clean = CaptionNoise.at_level(0.0)
    for tag in TAGS:
        assert all(c == line["prompt"] for line, c in _draw(tag, clean, n=300))
    half = CaptionNoise.at_level(0.5)
    assert half.count_wrong == pytest.approx(0.5 * REFERENCE_NOISE.count_wrong)
    assert CaptionNoise.at_level(10.0).count_wrong == 1.0  # clipped to a probability


def test_bad_rates_and_levels_are_refused():
    with pytest.raises(ValueError, match="count_wrong must be a probability"):
        CaptionNoise(count_wrong=1.5)
    with pytest.raises(ValueError, match="level must be >= 0"):
        CaptionNoise.at_level(-1)


def test_web_batches_are_deterministic_and_only_web_takes_noise():
    noise = CaptionNoise.at_level(1.0)
    a = render_batch(6, seed=3, split="web", noise=noise)
    b = render_batch(6, seed=3, split="web", noise=noise)
    assert a[1] == b[1] and bool((a[0] == b[0]).all())
    assert any(c != line["prompt"] for c, line in zip(*render_batch(64, 1, split="web", noise=noise)[1:], strict=True))
    with pytest.raises(ValueError, match="'web' split only"):
        render_batch(2, seed=0, split="train", noise=noise)
    clean = render_batch(16, seed=0, split="train")
    assert all(c == line["prompt"] for c, line in zip(clean[1], clean[2], strict=True))
    assert all(re.fullmatch(r"[a-z ]+", c) for c in a[1])
