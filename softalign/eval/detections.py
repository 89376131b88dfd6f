"""What a detector hands to the GenEval rules: one `Detection` per object, and the two plug-in protocols.

GenEval runs Mask2Former (mmdet 2.x) and classifies colours with CLIP ViT-L-14 on a masked crop. Neither is
available offline, so both are plug-ins here: any callable that follows [`Detector`] or [`ColorClassifier`] works,
including a trained shapes-world detector or a stub in a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

# GenEval's colour vocabulary, in its order (the order matters: failure reasons list colour counts in this order).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


@dataclass
class Detection:
    """One detected object.

    Args:
        label (`str`): class name, spelled as in the metadata (`"teddy bear"`, `"circle"`).
        score (`float`): calibrated confidence in [0, 1]; GenEval keeps `score > 0.3` (`> 0.9` for counting).
        box (`tuple[float, float, float, float]`): `(x0, y0, x1, y1)` in pixels, `x0 <= x1`, `y0 <= y1`, y down.
        mask (`np.ndarray`, *optional*): boolean `H x W` mask over the whole image; the colour classifier uses it.
        color (`str`, *optional*): the object's colour when the detector already knows it; it then takes the
            place of the colour classifier for this object.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"Detection.label must be a non-empty string, got {self.label!r}")
        try:
            self.score = float(self.score)
        except (TypeError, ValueError):
            raise ValueError(f"Detection.score must be a number, got {self.score!r}") from None
        if not math.isfinite(self.score):
            raise ValueError(f"Detection.score must be finite, got {self.score!r} for {self.label!r}")
        try:
            box = tuple(float(v) for v in self.box)
        except (TypeError, ValueError):
            raise ValueError(f"Detection.box must be 4 numbers (x0, y0, x1, y1), got {self.box!r}") from None
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"Detection.box must be 4 finite numbers (x0, y0, x1, y1), got {self.box!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"Detection.box must have x0 <= x1 and y0 <= y1 (pixels, y down), got {self.box!r}")
        self.box = box
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise ValueError(f"Detection.mask must be a 2-D H x W array, got shape {mask.shape}")
            self.mask = mask.astype(bool, copy=False)
        if self.color is not None and (not isinstance(self.color, str) or not self.color):
            raise ValueError(f"Detection.color must be a non-empty string or None, got {self.color!r}")

    def geneval_row(self) -> list[float]:
        """`[x0, y0, x1, y1, score]`, the form of one object in GenEval's `details` column."""
        return [*self.box, self.score]


@runtime_checkable
class Detector(Protocol):
    """Anything that turns an image into detections, e.g. `lambda image: [Detection("cat", 0.97, (0, 0, 9, 9))]`.

    Return every candidate with its calibrated score; thresholds, sorting and the per-class cap are the rules' job.
    """

    def __call__(self, image: Image.Image) -> list[Detection]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Anything that names the colour of one detected object, e.g. a CLIP zero-shot classifier over [`COLORS`].

    It is only asked about detections whose `color` is `None`. [`masked_crop`] prepares GenEval's input.
    """

    def __call__(self, image: Image.Image, detection: Detection) -> str: ...


def masked_crop(image: Image.Image, detection: Detection, background: str = "#999") -> Image.Image:
    """The crop GenEval's colour classifier sees: the object's mask over a flat grey, cut to its box.

    Args:
        image (`PIL.Image.Image`): the generated image.
        detection (`Detection`): the object; without a mask the plain box crop is returned.
        background (`str`, *optional*, defaults to `"#999"`): GenEval's default background colour.
    """
    rgb = image.convert("RGB")
    if detection.mask is not None:
        if detection.mask.shape != (rgb.height, rgb.width):
            raise ValueError(
                f"detection.mask has shape {detection.mask.shape} but the image is {rgb.height} x {rgb.width} (H x W)"
            )
        blank = Image.new("RGB", rgb.size, color=background)
        rgb = Image.composite(rgb, blank, Image.fromarray(detection.mask.astype(np.uint8) * 255, mode="L"))
    # PIL rounds a float box to whole pixels, exactly as in GenEval's `image.crop(box[:4])`.
    return rgb.crop(detection.box)
