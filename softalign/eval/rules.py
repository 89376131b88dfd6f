"""GenEval's scoring rules (`evaluation/evaluate_images.py`), applied unchanged to plug-in detections.

One image is scored in three steps:

1. keep detections with `score > 0.3` (`> 0.9` for every class when the tag is `counting`), sort each class by score,
   keep at most 16 per class; no NMS (GenEval's `max_overlap` is 1.0);
2. include clauses are ANDed: `found = objects[class][:count]` must be `count` long, have `count` of the wanted colour,
   and every found object must stand in the asked relation to every object of the referenced clause;
3. exclude clauses are ORed: any class with `len(objects[class]) >= count` fails the image.

Scores and boxes are compared in the detector's own precision ([`Detection.precision`]): GenEval's mmdet arrays are
float32, and NumPy compares `float32_array > 0.3` in float32, so a score equal to `float32(0.3)` is dropped (in
float64 it would be `0.30000001 > 0.3` and kept); `relative_position` computes its centres, sizes and norm in float32
for the same reason.

Failure reasons use GenEval's wording, one per line. Two choices go beyond GenEval, both documented where made:
ties in score are broken by box, colour and mask (GenEval's order among equal scores depends on its detector's
output order), and the relations in a position reason are sorted (GenEval prints a Python set, whose order varies
from run to run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .detections import COLORS, ColorClassifier, Detection, Detector
from .metadata import validate_metadata


@dataclass(frozen=True)
class RuleConfig:
    """GenEval's knobs (its `--options`), with its defaults. Change them only for a deliberately different judge.

    Args:
        threshold (`float`, *optional*, defaults to 0.3): keep detections with a score strictly above this.
        counting_threshold (`float`, *optional*, defaults to 0.9): the same, for every class, when the tag is
            `counting`; it assumes calibrated scores.
        max_objects (`int`, *optional*, defaults to 16): keep at most this many detections per class.
        position_threshold (`float`, *optional*, defaults to 0.1): share of the summed box sizes that an offset
            must exceed before it counts as a relation.
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold", "position_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RuleConfig.{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.max_objects, bool) or not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ValueError(f"RuleConfig.max_objects must be a positive integer, got {self.max_objects!r}")


GENEVAL = RuleConfig()


def _order_key(detection: Detection) -> tuple:
    # Score first (descending), as GenEval. Equal scores are ordered by what the detection *is* (box, then colour,
    # then mask), never by its position in the input list, so shuffling a detector's output cannot change which
    # objects survive the cap or which ones are `found`. Detections equal in all of these are interchangeable.
    mask = detection.mask
    mask_key = (0, (), b"") if mask is None else (1, mask.shape, mask.tobytes())
    return (-detection.score, detection.box, detection.color or "", mask_key)


def select_objects(
    detections: Iterable[Detection], tag: str, config: RuleConfig = GENEVAL
) -> dict[str, list[Detection]]:
    """Step 1: the confident detections per class, best first, capped; classes with none are left out.

    Equal scores are ordered by box `(x0, y0, x1, y1)`, then colour, then mask, so the result (and every verdict)
    is the same for any order of `detections`.

    Args:
        detections (`Iterable[Detection]`): everything the detector returned.
        tag (`str`): the metadata tag; `"counting"` raises the threshold for every class.
        config (`RuleConfig`, *optional*): GenEval's defaults unless given.
    """
    threshold = config.counting_threshold if tag == "counting" else config.threshold
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:
        if not isinstance(detection, Detection):
            raise TypeError(f"expected Detection objects, got {type(detection).__name__}: {detection!r}")
        if above(detection.score, threshold, detection.precision):  # strictly above, as GenEval
            by_class.setdefault(detection.label, []).append(detection)
    return {label: sorted(found, key=_order_key)[: config.max_objects] for label, found in sorted(by_class.items())}


def above(score: float, threshold: float, precision: str = "float64") -> bool:
    """`score > threshold` with both rounded to `precision` first, as NumPy compares a float32 array with a Python
    float (GenEval's `bbox[:, 4] > 0.3`): `above(float(np.float32(0.3)), 0.3, "float32")` is False."""
    dtype = np.dtype(precision)
    return bool(
        np.asarray(score, dtype=np.float64).astype(dtype) > np.asarray(threshold, dtype=np.float64).astype(dtype)
    )


def relative_position(box_a, box_b, threshold: float = 0.1, precision: str = "float64") -> set[str]:
    """Where box A is relative to box B, GenEval's way: a set of `"left of"`, `"right of"`, `"above"`, `"below"`.

    The centre offset is shrunk on each axis by `threshold` times the summed box sizes on that axis; if nothing is
    left (below 1e-3 on both axes) there is no relation. Otherwise the shrunk offset over the length of the raw
    offset gives `(dx, dy)`; beyond 0.5 on an axis is a relation, so a diagonal can give two. Image y points down:
    `"above"` means a smaller y.

    Args:
        box_a, box_b (`tuple[float, float, float, float]`): `(x0, y0, x1, y1)` in pixels.
        threshold (`float`, *optional*, defaults to 0.1): GenEval's `position_threshold`.
        precision (`str`, *optional*, defaults to `"float64"`): the dtype every step is computed in; GenEval's
            boxes are mmdet's float32 arrays, so a [`Detection`] with `precision="float32"` is measured in float32.
    """
    # GenEval's own steps, in NumPy and in the boxes' dtype (a Python scalar joins an array in the array's dtype).
    boxes = np.array([list(box_a[:4]), list(box_b[:4])], dtype=np.float64).astype(precision).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)  # raw, not revised, offset: close objects need more angle
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _color_of(detection: Detection, image, color_classifier: ColorClassifier | None, clause: dict) -> str:
    if detection.color is not None:
        return detection.color
    if color_classifier is None:
        raise ValueError(
            f"the clause {clause!r} asks for a colour, but a {detection.label!r} detection has color=None and no "
            "color_classifier was given; pass one (e.g. CLIP on softalign.eval.masked_crop) or set Detection.color"
        )
    color = color_classifier(image, detection)
    if not isinstance(color, str) or not color:
        raise ValueError(f"color_classifier must return a colour name (str), got {color!r} for {detection!r}")
    return color


def _colors_of(found: list[Detection], image, color_classifier, clause: dict) -> list[str]:
    # A classifier with `classify(image, detections)` (e.g. CLIPColorClassifier) names all unknown colours at once.
    unknown = [obj for obj in found if obj.color is None]
    if not unknown or not hasattr(color_classifier, "classify"):
        return [_color_of(obj, image, color_classifier, clause) for obj in found]
    named = list(color_classifier.classify(image, unknown))
    if len(named) != len(unknown):
        raise ValueError(f"color_classifier.classify returned {len(named)} colours for {len(unknown)} detections")
    named.reverse()
    colors = [obj.color if obj.color is not None else named.pop() for obj in found]
    for color, obj in zip(colors, found, strict=True):
        if not isinstance(color, str) or not color:
            raise ValueError(f"color_classifier.classify must return colour names (str), got {color!r} for {obj!r}")
    return colors


def _color_reason(clause: dict, colors: list[str]) -> str:
    wanted, name, count = clause["color"], clause["class"], clause["count"]
    # GenEval lists the counts in its COLORS order; colours outside its ten (shapes world) follow, sorted.
    order = [c for c in COLORS if c in colors] + sorted(set(colors) - set(COLORS))
    tally = ", ".join(f"{colors.count(c)} {c}" for c in order)
    return f"expected {wanted} {name}>={count}, found {colors.count(wanted)} {wanted}; and {tally}"


def evaluate_detections(
    detections: Iterable[Detection],
    metadata: dict,
    color_classifier: ColorClassifier | None = None,
    image: Image.Image | None = None,
    *,
    config: RuleConfig = GENEVAL,
) -> tuple[bool, str, dict[str, list[list[float]]]]:
    """Score one image's detections against one GenEval metadata line.

    Args:
        detections (`Iterable[Detection]`): everything the detector returned, unfiltered.
        metadata (`dict`): one metadata line (checked with [`validate_metadata`]).
        color_classifier (`ColorClassifier`, *optional*): names colours of found objects that carry no `color`;
            needed only for colour clauses.
        image (`PIL.Image.Image`, *optional*): handed to `color_classifier`; give it when the classifier reads pixels.
        config (`RuleConfig`, *optional*): GenEval's defaults unless given.

    Returns:
        `tuple[bool, str, dict]`: `correct`; `reason`, GenEval's failure reasons joined by newlines (empty when
        correct); `details`, GenEval's column: per kept class, `[x0, y0, x1, y1, score]` per object, best first.
    """
    validate_metadata(metadata)
    objects = select_objects(detections, metadata["tag"], config)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []  # per include clause: its found objects, or None if it failed
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = _colors_of(found, image, color_classifier, clause)
                if colors.count(clause["color"]) < count:
                    matched = False
                    reasons.append(_color_reason(clause, colors))
            # As GenEval: the position is checked only when the class and colour matched.
            if "position" in clause and matched:
                relation, target = clause["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    matched = _check_relation(found, matched_groups[target], name, relation, config, reasons)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        present = len(objects.get(name, []))
        if present >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {present}")
    details = {label: [obj.geneval_row() for obj in found] for label, found in objects.items()}
    return correct, "\n".join(reasons), details


def _check_relation(found, targets, name: str, relation: str, config: RuleConfig, reasons: list[str]) -> bool:
    # Every found A against every B of the referenced clause; the first pair that fails gives the one reason.
    for obj in found:
        for target in targets:
            # GenEval stacks both boxes into one array: mixed precisions meet in the wider one
            precision = str(np.promote_types(obj.precision, target.precision))
            relations = relative_position(obj.box, target.box, config.position_threshold, precision)
            if relation not in relations:
                # GenEval joins a set (arbitrary order); sorted here so reasons are reproducible. An empty set gives
                # GenEval's "found  target" with two spaces.
                reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(relations))} target")
                return False
    return True


def evaluate_image(
    image: Image.Image,
    metadata: dict,
    detector: Detector,
    color_classifier: ColorClassifier | None = None,
    *,
    config: RuleConfig = GENEVAL,
) -> tuple[bool, str, dict[str, list[list[float]]]]:
    """Detect objects in `image` with `detector` and score them with [`evaluate_detections`].

    Args:
        image (`PIL.Image.Image`): the generated image.
        metadata (`dict`): its GenEval metadata line.
        detector (`Detector`): returns a list of [`Detection`] for the image.
        color_classifier (`ColorClassifier`, *optional*): see [`evaluate_detections`].
        config (`RuleConfig`, *optional*): GenEval's defaults unless given.
    """
    validate_metadata(metadata)
    detections = detector(image)
    if not isinstance(detections, (list, tuple)):
        raise TypeError(f"detector must return a list of Detection, got {type(detections).__name__}")
    return evaluate_detections(detections, metadata, color_classifier, image, config=config)
