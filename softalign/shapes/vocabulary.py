"""The shapes world's vocabulary (v2): a small GenEval (arXiv 2310.11513) with flat shapes instead of COCO objects.

v2 has six shapes and six colours, so that every tag but single_object has at least 8 held-out prompts (v1 had four
shapes and five colours: counting had 3 held-out prompts and colors 4, too few to tell stages apart). The v1 world
and the tables measured in it are reproducible at commit 7bc9ab6 (`git checkout 7bc9ab6`); it is retired rather
than kept beside v2 because its models were pretrained on perfect captions of the post-training data and leave
nothing for alignment to fix (see `docs/shapes_world.md`), and two worlds would double every detector, split and test.
"""

from __future__ import annotations

WORLD_VERSION = 2

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS = {shape: f"{shape}es" if shape.endswith("s") else f"{shape}s" for shape in SHAPES}  # crosses

# Saturated colours, far apart in RGB so that blur and noise never turn one into another (black is far from every
# hue; GenEval's orange and pink sit too close to red / yellow / purple for a 64-pixel generator).
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 190),
    "black": (35, 35, 35),
}
BACKGROUND = (255, 255, 255)

RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
TRAIN_COUNTS = (2, 3, 4, 5)  # counting captions seen in training (one object is single_object)
EVAL_COUNTS = (2, 3, 4)  # GenEval asks for two to four

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def article(word: str) -> str:
    """ "a" or "an" before `word`."""
    return "an" if word[0] in "aeiou" else "a"
