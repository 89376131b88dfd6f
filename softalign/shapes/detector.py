"""A calibrated shapes-world detector for generated images: segment the ink, label components, classify each crop.

Generated images are blurred, noisy, off-colour and soft-cornered, so shapes are told apart by a small CNN trained on
degraded renders (`scripts/train_shapes_detector.py`), not by geometric rules (those misread soft-cornered squares).
1. ink = `(255 - darkest channel) / 255`: ~0.85 on every palette colour, 0 on white, so one threshold finds objects
   whatever their hue, while faint smudges and noise stay below it;
2. 8-connected components (numpy only), specks and faint components dropped;
3. each component's ink, masked to it, on a square around its box, resampled to `crop_size`: the CNN says one of
   the four shapes or `junk` (fragments, blobs, smudges, merged objects);
4. softmax with a temperature fitted on held-out data, so `score` is a calibrated probability (GenEval's counting
   keeps `score > 0.9`); the colour is the nearest palette colour of the component's core.
A `junk` component is split when it is two touching objects (by colour, else where a higher ink level or an erosion
separates it) and the parts are classified again; same-coloured objects merged with no neck stay one `junk`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..eval.detections import Detection
from .vocabulary import COLORS, SHAPES

CLASSES = (*SHAPES, "junk")
DEFAULT_PATH = Path(__file__).with_name("detector.safetensors")
_COLOR_NAMES = tuple(COLORS)
_INK = 255.0 - np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32)  # palette as ink vectors, K x 3


@dataclass(frozen=True)
class DetectorConfig:
    """Everything but the weights; stored as JSON in the safetensors metadata.

    Args:
        crop_size (`int`): side of the CNN input.
        ink_threshold (`float`): ink above this is foreground (a full palette pixel is ~0.85).
        peak_threshold (`float`): a component whose ink never reaches this is a faint smudge, dropped.
        min_area (`float`): components smaller than this (pixels of a 64x64 image, scaled by area) are specks.
        temperature (`float`): softmax temperature fitted on held-out data.
        min_score (`float`): shape detections below this probability are not returned at all.
        split_share (`float`): a junk component is split by colour when its second colour has this share of pixels.
        widths (`tuple[int, int, int]`): CNN channel widths.
    """

    crop_size: int = 24
    ink_threshold: float = 0.4
    peak_threshold: float = 0.55
    min_area: float = 8.0
    temperature: float = 1.0
    min_score: float = 0.02
    split_share: float = 0.2
    widths: tuple[int, int, int] = (16, 32, 64)


class ShapesNet(nn.Module):
    """Three conv-pool stages and a small head: 1 x S x S ink crop -> logits over `CLASSES`."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        layers, channels = [], 1
        for width in config.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = config.crop_size // 8
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, 64), nn.ReLU(), nn.Linear(64, len(CLASSES))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over `CLASSES` of ink crops `(B, 1, S, S)`."""
        return self.head(self.features(x))


@dataclass
class Component:
    """One connected blob of ink: its pixel box `(x0, y0, x1, y1)` (x1, y1 exclusive), mask, colour and, once
    classified, calibrated probabilities over `CLASSES`."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    color: str
    probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The most probable class of the classified component."""
        return CLASSES[int(np.argmax(self.probs))]


def to_rgb_array(image) -> np.ndarray:
    """Any PIL image (RGB, RGBA over white, L, P, ...) or H x W x 3 uint8 array -> H x W x 3 uint8 RGB."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {image.dtype} of shape {image.shape}")
        array = image
    elif isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")  # transparent means background, i.e. white
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        array = np.asarray(image.convert("RGB"))
    else:
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if min(array.shape[:2]) < 8:
        raise ValueError(f"image of size {array.shape[1]}x{array.shape[0]} (W x H) is too small; need >= 8x8 pixels")
    return array


def ink_map(rgb: np.ndarray) -> np.ndarray:
    """`(255 - darkest channel) / 255` as float32: 0 on white, ~0.85 on every palette colour."""
    return (255.0 - rgb.min(axis=-1).astype(np.float32)) / 255.0


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean H x W mask, numpy only.

    Each foreground pixel ends with the flat index of its component's first pixel, background with -1. Labels only
    ever decrease and always name a pixel of the same component, so `lab[lab]` (pointer jumping) is a valid shortcut
    and convergence takes a few dozen cheap passes on a 64x64 image, not one per pixel of diameter.
    """
    big = mask.size
    lab = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        new = np.minimum.reduce(_neighbours(lab, big))
        new[~mask] = big
        flat = new.ravel()
        fg = flat < big
        flat[fg] = flat[flat[fg]]
        flat[fg] = flat[flat[fg]]
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def pixel_colors(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette colour of each of N x 3 RGB pixels, by un-mixing with white.

    A pixel is modelled as `white - a * (white - colour)`: anti-aliased edges and washed-out colours are a palette
    colour mixed with the background, which plain RGB distance gets wrong (light red is closer to purple than to red).
    Returns the palette index and the residual of each pixel.
    """
    ink = 255.0 - rgb.reshape(-1, 3).astype(np.float32)
    amount = np.clip(ink @ _INK.T / (_INK * _INK).sum(1), 0.0, None)  # N x K
    residual = np.linalg.norm(ink[:, None, :] - amount[:, :, None] * _INK[None], axis=2)
    return residual.argmin(1), residual.min(1)


def core_color(rgb: np.ndarray, ink: np.ndarray, mask: np.ndarray) -> str:
    """Palette colour of the median of the inkiest half of a component: its edges are mixed with white or a
    neighbour, and a generator's noise or smudges shift single pixels."""
    core = mask & (ink >= np.median(ink[mask]))
    return _COLOR_NAMES[int(pixel_colors(np.median(rgb[core], axis=0)[None])[0][0])]


def _neighbours(array: np.ndarray, fill) -> list[np.ndarray]:
    """The nine shifted copies of `array` that put each pixel's 3x3 neighbours in its place (plain slices: faster
    than a sliding-window view on small images)."""
    padded, (h, w) = np.pad(array, 1, constant_values=fill), array.shape
    return [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(_neighbours(mask, False))


def subpixel_box(mask: np.ndarray, ink: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    """Box `(x0, y0, x1, y1)` of a component with sub-pixel edges.

    Whole-pixel extents are up to half a pixel off per edge, enough to flip GenEval's position rule on close
    diagonal pairs. An edge at `e` covers the last outside pixel by `max(0, x0 - e)` and the first inside one by
    `min(1, x0 + 1 - e)`, so `x0 - cover(x0 - 1) + 1 - cover(x0)` recovers `e`; cover is the most-covered pixel of
    the column (ink over the component's full ink), counting only the component and its rim, not a neighbour.
    """
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    background = float(np.median(ink))
    # an image that is mostly ink has its median near the object's ink level: keep the scale positive
    full = max(max(float(np.percentile(ink[mask], 90)), threshold) - background, 1e-6)
    near = _dilate(mask) & ~((ink > threshold) & ~mask)
    cover = np.where(near, np.clip((ink - background) / full, 0.0, 1.0), 0.0)
    cols, rows = np.pad(cover.max(0), 1), np.pad(cover.max(1), 1)  # padded: index i + 1 is column i
    return (
        float(x0 - cols[x0] + 1 - cols[x0 + 1]),
        float(y0 - rows[y0] + 1 - rows[y0 + 1]),
        float(x1 + cols[x1 + 1] - 1 + cols[x1]),
        float(y1 + rows[y1 + 1] - 1 + rows[y1]),
    )


def find_components(rgb: np.ndarray, config: DetectorConfig) -> tuple[np.ndarray, list[Component]]:
    """The ink map and the components of one image worth classifying (specks and faint smudges dropped)."""
    ink = ink_map(rgb)
    labels = label_components(ink > config.ink_threshold)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    components = []
    for ident in ids[counts >= _min_area(ink, config)]:
        mask = labels == ident
        if ink[mask].max() >= config.peak_threshold:
            components.append(_part(mask, ink, core_color(rgb, ink, mask), config))
    return ink, components


def crop_inputs(ink: np.ndarray, components: list[Component], config: DetectorConfig) -> torch.Tensor:
    """CNN inputs, N x 1 x S x S: each component's ink, normalised, on a square window around its box.

    Only the component and a one-pixel rim (its soft edge) are kept, so a neighbour that almost touches it is not
    seen. Dividing by the component's 90th-percentile ink makes light and dark colours look alike to the CNN.
    """
    size = config.crop_size
    if not components:
        return torch.zeros(0, 1, size, size)
    h, w = ink.shape
    masks = torch.from_numpy(np.stack([c.mask for c in components])).float()[:, None]
    foreground = torch.from_numpy(ink > config.ink_threshold).float()[None, None]
    rim = F.max_pool2d(masks, 3, stride=1, padding=1)
    region = torch.minimum(rim, 1.0 - foreground + masks)
    scale = torch.tensor([np.percentile(ink[c.mask], 90) for c in components], dtype=torch.float32)
    x = torch.from_numpy(ink)[None, None] * region / scale.clamp_min(0.05)[:, None, None, None]
    factor = max(1, max(h, w) // 128)  # large images: average first, so that bilinear resampling does not alias
    if factor > 1:
        x = F.avg_pool2d(x, factor, ceil_mode=True)
    x0, y0, x1, y1 = torch.tensor([c.box for c in components], dtype=torch.float32).T
    side, zero = 1.2 * torch.maximum(x1 - x0, y1 - y0) + 2.0, torch.zeros(len(components))
    theta = torch.stack([side / w, zero, (x0 + x1) / w - 1.0, zero, side / h, (y0 + y1) / h - 1.0], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, [len(components), 1, size, size], align_corners=False)
    return F.grid_sample(x.clamp(0.0, 1.5), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def split_touching(rgb: np.ndarray, ink: np.ndarray, component: Component, config: DetectorConfig) -> list[Component]:
    """Parts of a component that may be touching objects, `[]` if it does not come apart.

    First by palette colour, when a second colour holds `split_share` of the pixels. Else by cores that separate at
    a higher ink level (objects joined by their soft edges) or after erosion (a neck: two tangent circles share one
    three to five pixels thick); each core then takes back its own soft edge, a contested pixel going to the first.
    """
    ys, xs = np.nonzero(component.mask)
    index, _ = pixel_colors(rgb[ys, xs])
    counts = np.bincount(index, minlength=len(_COLOR_NAMES))
    if np.sort(counts)[-2] >= config.split_share * len(index):
        parts = []
        for k in np.nonzero(counts >= config.split_share * len(index))[0]:
            sub = np.zeros_like(component.mask)
            sub[ys[index == k], xs[index == k]] = True
            labels = label_components(sub)
            masks = [labels == ident for ident in np.unique(labels[labels >= 0])]
            parts += [_part(m, ink, _COLOR_NAMES[k], config) for m in masks if m.sum() >= _min_area(ink, config)]
        return parts
    full = float(np.percentile(ink[component.mask], 90))
    candidates, eroded = [component.mask & (ink > level * full) for level in (0.6, 0.75, 0.9)], component.mask
    for _ in range(3):
        eroded = ~_dilate(~eroded)
        candidates.append(eroded)
    for core in candidates:
        labels = label_components(core)
        ids, counts = np.unique(labels[labels >= 0], return_counts=True)
        cores = ids[counts >= _min_area(ink, config)]
        if len(cores) >= 2:
            break
    else:
        return []
    owner = np.full(ink.shape, -1)
    for k, ident in enumerate(cores):
        owner[labels == ident] = k
    for _ in range(3):  # soft edges are about two pixels wide
        for k in range(len(cores)):
            owner[_dilate(owner == k) & component.mask & (owner == -1)] = k
    return [_part(owner == k, ink, core_color(rgb, ink, owner == k), config) for k in range(len(cores))]


def _part(mask: np.ndarray, ink: np.ndarray, color: str, config: DetectorConfig) -> Component:
    return Component(subpixel_box(mask, ink, config.ink_threshold), mask, color)


def _min_area(ink: np.ndarray, config: DetectorConfig) -> float:
    return max(2.0, config.min_area * ink.size / 64**2)


class ShapesDetector:
    """Shapes-world detector following the `Detector` protocol: `detector(image) -> list[Detection]`.

    Args:
        model (`ShapesNet`): the crop classifier.
        config (`DetectorConfig`): thresholds and the fitted temperature.

    Example:
        >>> detector = ShapesDetector.load()
        >>> [(d.label, d.color, round(d.score, 3)) for d in detector(image)]
    """

    def __init__(self, model: ShapesNet, config: DetectorConfig):
        self.model = model.eval()
        self.config = config

    @classmethod
    def load(cls, path: str | Path | None = None) -> ShapesDetector:
        """Load weights and config from a safetensors file (default: the committed `detector.safetensors`)."""
        path = Path(path) if path is not None else DEFAULT_PATH
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path} has no 'config' in its safetensors metadata; is it a ShapesDetector file?")
        raw = json.loads(metadata["config"])
        config = DetectorConfig(**{**raw, "widths": tuple(raw["widths"])})
        model = ShapesNet(config)
        model.load_state_dict(load_file(str(path)))
        return cls(model, config)

    def save(self, path: str | Path, **extra_metadata: str) -> None:
        """Write float32 weights with the config (and any extra string metadata) to `path`."""
        tensors = {k: v.detach().float().contiguous() for k, v in self.model.state_dict().items()}
        metadata = {"config": json.dumps(asdict(self.config)), "classes": json.dumps(CLASSES), **extra_metadata}
        save_file(tensors, str(path), metadata=metadata)

    def analyze(self, images) -> list[list[Component]]:
        """Components of each image with calibrated `probs` (the label may be `junk`); one CNN call per pass."""
        arrays = [to_rgb_array(image) for image in images]
        found = [find_components(rgb, self.config) for rgb in arrays]
        self._classify([(ink, comps) for ink, comps in found])
        results, retry = [], []
        for rgb, (ink, comps) in zip(arrays, found, strict=True):
            kept = []
            for comp in comps:
                parts = split_touching(rgb, ink, comp, self.config) if comp.label == "junk" else []
                kept += parts or [comp]
                if parts:
                    retry.append((ink, parts))
            results.append(kept)
        self._classify(retry)
        return results

    def _classify(self, groups: list[tuple[np.ndarray, list[Component]]]) -> None:
        crops = [crop_inputs(ink, comps, self.config) for ink, comps in groups if comps]
        if not crops:
            return
        with torch.no_grad():
            probs = torch.softmax(self.model(torch.cat(crops)) / self.config.temperature, dim=1).numpy()
        components = [comp for _, comps in groups for comp in comps]
        for comp, p in zip(components, probs, strict=True):
            comp.probs = p

    def detect_batch(self, images) -> list[list[Detection]]:
        """Detections of each image (see [`ShapesDetector.to_detections`]); images of any size and mode."""
        return [self.to_detections(comps) for comps in self.analyze(images)]

    def to_detections(self, components: list[Component]) -> list[Detection]:
        """Per component its most likely shape with that shape's calibrated probability.

        A component that is more likely `junk` still reports its best shape with its (low) probability: GenEval's
        thresholds decide, as they do with any detector's candidates. Below `min_score` nothing is reported.
        """
        best = [(comp, int(np.argmax(comp.probs[: len(SHAPES)]))) for comp in components]
        return [
            Detection(SHAPES[k], float(c.probs[k]), c.box, c.mask, c.color)
            for c, k in best
            if c.probs[k] >= self.config.min_score
        ]

    def __call__(self, image) -> list[Detection]:
        """The detections of one image (see [`detect_batch`])."""
        return self.detect_batch([image])[0]
