"""The shapes world's vocabulary: a small GenEval (arXiv 2310.11513) with flat shapes instead of COCO objects."""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

# Saturated colours, far apart in RGB so that blur and noise never turn one into another.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 190),
}
BACKGROUND = (255, 255, 255)

RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
TRAIN_COUNTS = (2, 3, 4, 5)  # counting captions seen in training (one object is single_object)
EVAL_COUNTS = (2, 3, 4)  # GenEval asks for two to four

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
