"""What a detector hands to the GenEval rules: one `Detection` per object, and the two plug-in protocols.

GenEval runs Mask2Former (mmdet 2.x) and classifies colours with CLIP ViT-L-14 on a masked crop. Neither is
available offline, so both are plug-ins here: any callable that follows [`Detector`] or [`ColorClassifier`] works,
including a trained shapes-world detector or a stub in a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

# The precisions a score can be compared in. GenEval compares mmdet's float32 scores with 0.3 / 0.9 in float32, where
# `float32(0.3) > 0.3` is False: the threshold is rounded to float32 first (NumPy's scalar casting, old and new).
PRECISIONS = ("float16", "float32", "float64")


def _precision_of(value) -> str:
    """The precision a detector produced `value` in: a NumPy / torch float's own dtype, float64 for Python numbers."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return "float64"
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":  # NumPy has no bfloat16; its values are exact in float32
        return "float32"
    return name if name in PRECISIONS else "float64"  # integer scores: compared as Python numbers


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
        precision (`str`, *optional*): `"float16"`, `"float32"` or `"float64"`, the precision the detector computed
            the score and box in; the rules compare thresholds and box geometry in it, as GenEval does with mmdet's
            float32 arrays. Defaults to the dtype of `score` (a `np.float32` or a float32 tensor gives `"float32"`,
            bfloat16 gives `"float32"`, a Python float `"float64"`). A declared precision rounds `score` and `box`
            to it, since that is the value the detector would have produced.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None
    precision: str | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"Detection.label must be a non-empty string, got {self.label!r}")
        if self.precision is None:
            self.precision = _precision_of(self.score)
        elif self.precision not in PRECISIONS:
            raise ValueError(f"Detection.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        dtype = np.dtype(self.precision)
        try:
            # float() of a NumPy / torch scalar is exact; the round trip through `dtype` only changes a value that was
            # declared in a lower precision than it came in.
            self.score = float(np.asarray(float(self.score), dtype=np.float64).astype(dtype))
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
        self.box = tuple(float(v) for v in np.asarray(box, dtype=np.float64).astype(dtype))
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise ValueError(f"Detection.mask must be a 2-D H x W array, got shape {mask.shape}")
            self.mask = mask.astype(bool, copy=False)
        if self.color is not None and (not isinstance(self.color, str) or not self.color):
            raise ValueError(f"Detection.color must be a non-empty string or None, got {self.color!r}")

    def geneval_row(self) -> list[float]:
        """`[x0, y0, x1, y1, score]`, the form of one object in GenEval's `details` column (Python floats, as its
        `box.tolist()` gives)."""
        return [*self.box, self.score]


@runtime_checkable
class Detector(Protocol):
    """Anything that turns an image into detections, e.g. `lambda image: [Detection("cat", 0.97, (0, 0, 9, 9))]`.

    Return every candidate with its calibrated score; thresholds, sorting and the per-class cap are the rules' job.
    """

    def __call__(self, image: Image.Image) -> list[Detection]:
        """Every object found in `image`, with GenEval's fields."""


@runtime_checkable
class ColorClassifier(Protocol):
    """Anything that names the colour of one detected object, e.g. a CLIP zero-shot classifier over [`COLORS`].

    It is only asked about detections whose `color` is `None`. [`masked_crop`] prepares GenEval's input.
    """

    def __call__(self, image: Image.Image, detection: Detection) -> str:
        """The colour name of `detection` in `image`."""


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
