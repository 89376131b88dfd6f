"""GenEval's object detector on transformers: Mask2Former instance segmentation, post-processed as mmdet 2.x does.

GenEval runs `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco` through mmdet's `inference_detector`. This module
reproduces that path on `transformers.Mask2FormerForUniversalSegmentation`:

1. input (mmdet's test pipeline): resize keeping the aspect ratio so the image fits 1333 x 800
   (`scale = min(1333 / long side, 800 / short side)`, sizes rounded half up), bilinear, back to 8-bit values;
   normalise with ImageNet's mean / std in 0-255 RGB; zero-pad (after normalising) to a multiple of 32;
2. masks: the query mask logits are upsampled to the padded input, cropped to the resized image, and resized to
   the original image (bilinear, `align_corners=False` both times);
3. instances (mmdet's `MaskFormerFusionHead.instance_postprocess`): class probabilities are the softmax without
   the no-object column; the top 100 (query, class) pairs are kept; a mask is `logit > 0`; the score is the class
   probability times the mean mask probability inside the mask; the box is the mask's extent
   (`x1 = last column + 1`, mmdet's `mask2bbox`); an empty mask gives a zero box.

Scores and boxes are float32, as mmdet's arrays, so GenEval's thresholds apply in float32 ([`Detection.precision`]).

Differences that remain (reports say "GenEval rules, Mask2Former (transformers) detector" for this reason):
- the weights: transformers' COCO checkpoints are conversions of the authors' Detectron2 models, not the
  checkpoint OpenMMLab retrained that GenEval downloads; scores differ, so numbers are comparable between runs of
  this detector, not to published GenEval tables;
- the resize: OpenCV's 8-bit bilinear uses fixed-point weights, `torch.nn.functional.interpolate` float weights,
  so a resized pixel can differ by one grey level;
- the feature extractor: transformers' Swin and deformable-attention pixel decoder are re-implementations; their
  outputs match the originals to float tolerance, not bit for bit.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .coco import geneval_names
from .detections import Detection
from .local import local_dir, read_config, require_model_type

# mmdet 2.x `img_norm_cfg` of GenEval's config (also Detectron2's PIXEL_MEAN / PIXEL_STD): RGB, 0-255.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def resized_size(width: int, height: int, scale: tuple[int, int] = (1333, 800)) -> tuple[int, int]:
    """mmcv's `rescale_size` with `keep_ratio=True`: `(new_width, new_height)` so the image fits `scale`
    (long side, short side)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's `mask2bbox`: `(N, H, W)` bool masks -> `(N, 4)` float32 `(x0, y0, x1, y1)`, `x1`/`y1` one past the
    last pixel; an empty mask gives zeros."""
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    columns, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    width, height = masks.shape[2], masks.shape[1]
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    present = columns.any(dim=1)
    x0 = torch.where(columns, xs, width).min(dim=1).values
    x1 = torch.where(columns, xs, -1).max(dim=1).values + 1
    y0 = torch.where(rows, ys, height).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values + 1
    stacked = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[present] = stacked[present]
    return boxes


class Mask2FormerDetector:
    """A [`Detector`] over `Mask2FormerForUniversalSegmentation` that scores as GenEval's mmdet pipeline.

    Args:
        model (`transformers.Mask2FormerForUniversalSegmentation`): a COCO instance-segmentation model.
        class_names (`list[str]`): GenEval's name for each of the model's labels (see [`geneval_names`]).
        scale (`tuple[int, int]`, *optional*, defaults to `(1333, 800)`): the resize target (long, short side).
        size_divisor (`int`, *optional*, defaults to 32): the input is zero-padded to a multiple of this.
        max_per_image (`int`, *optional*, defaults to 100): (query, class) pairs kept per image (mmdet's
            `max_per_image`).

    Example:

    ```python
    >>> from softalign.eval import Mask2FormerDetector, evaluate_image
    >>> detector = Mask2FormerDetector.from_pretrained("models/mask2former-swin-small-coco-instance", device="cuda")
    >>> detections = detector(image)  # list of Detection: GenEval names, float32 scores, boxes and masks
    ```
    """

    name = "Mask2Former (transformers)"

    def __init__(
        self,
        model,
        class_names: list[str],
        scale: tuple[int, int] = (1333, 800),
        size_divisor: int = 32,
        max_per_image: int = 100,
    ):
        num_labels = model.config.num_labels
        if len(class_names) != num_labels:
            raise ValueError(f"class_names has {len(class_names)} names but the model has {num_labels} labels")
        self.model = model.eval()
        self.class_names = list(class_names)
        self.scale = scale
        self.size_divisor = size_divisor
        self.max_per_image = max_per_image

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> Mask2FormerDetector:
        """Load a local Mask2Former COCO instance-segmentation directory (`config.json` + weights); never downloads.

        Args:
            path (`str` or `os.PathLike`): e.g. a saved copy of `facebook/mask2former-swin-small-coco-instance`.
            device (`str` or `torch.device`, *optional*): where to run (default: CPU).
            torch_dtype (`torch.dtype`, *optional*): the weights' dtype (default float32); scores are computed in
                float32 either way.
            kwargs: `scale`, `size_divisor`, `max_per_image` of the constructor (GenEval's values by default).

        Raises:
            `FileNotFoundError`: the directory or its files are missing. `ValueError`: it is not a Mask2Former
            instance-segmentation checkpoint with GenEval's 80 classes.
        """
        from transformers import Mask2FormerForUniversalSegmentation

        expected = "a Mask2Former COCO instance-segmentation checkpoint (config.json, model.safetensors)"
        folder = local_dir(path, "Mask2FormerDetector", expected)
        config = read_config(folder)
        require_model_type(folder, config, ("mask2former",), "Mask2FormerDetector")
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 0))}
        names = geneval_names(id2label, source=str(folder / "config.json"))
        model = Mask2FormerForUniversalSegmentation.from_pretrained(
            folder, local_files_only=True, **({"dtype": torch_dtype} if torch_dtype else {})
        )
        if device is not None:
            model.to(device)
        return cls(model, names, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    def _inputs(self, images: list[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Step 1 for images of one size: `(B, 3, H_pad, W_pad)` float32 and the resized `(height, width)`."""
        height, width = images[0].shape[:2]
        new_w, new_h = resized_size(width, height, self.scale)
        pixels = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
            pixels = pixels.round().clamp(0, 255)  # mmcv resizes 8-bit images to 8-bit images
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        pixels = (pixels - mean) * (1 / std)  # mmcv's imnormalize multiplies by 1 / std
        pad_h = -new_h % self.size_divisor
        pad_w = -new_w % self.size_divisor
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
        return pixels, (new_h, new_w)

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """Detections for each image. Images of equal size share a forward pass: their padding is what a
        one-at-a-time run gives, so scores agree with it to float tolerance (batched kernels sum in another order;
        GenEval itself scores one image at a time)."""
        arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
        results: list[list[Detection] | None] = [None] * len(arrays)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, array in enumerate(arrays):
            by_size.setdefault(array.shape[:2], []).append(index)
        dtype = next(self.model.parameters()).dtype
        for (height, width), indices in by_size.items():
            pixels, (new_h, new_w) = self._inputs([arrays[i] for i in indices])
            out = self.model(pixel_values=pixels.to(dtype))
            class_logits = out.class_queries_logits.float()  # (B, Q, C + 1)
            for row, index in enumerate(indices):
                # Step 2, one image at a time (Q full-size masks each): to the padded input, crop, to the original.
                masks = out.masks_queries_logits[row : row + 1].float()  # (1, Q, H_pad / 4, W_pad / 4)
                masks = F.interpolate(masks, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
                masks = F.interpolate(
                    masks[:, :, :new_h, :new_w], size=(height, width), mode="bilinear", align_corners=False
                )
                results[index] = self._instances(class_logits[row], masks[0])
        return results  # type: ignore[return-value]

    def _instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> list[Detection]:
        """Step 3 for one image: `(Q, C + 1)` class logits and `(Q, H, W)` mask logits -> detections."""
        num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
        scores = class_logits.softmax(dim=-1)[:, :-1].flatten()  # (Q * C,): query-major, as mmdet
        k = min(self.max_per_image, scores.numel())
        top_scores, top = scores.topk(k, sorted=False)
        labels = top % num_classes
        queries = torch.div(top, num_classes, rounding_mode="floor")
        masks = mask_logits[queries]  # (k, H, W)
        binary = masks > 0
        mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        det_scores = (top_scores * mask_scores).cpu().numpy().astype(np.float32)
        boxes = masks_to_boxes(binary).cpu().numpy()
        binary = binary.cpu().numpy()
        assert num_queries * num_classes == scores.numel()
        return [
            Detection(self.class_names[int(label)], det_scores[j], boxes[j], mask=binary[j], precision="float32")
            for j, label in enumerate(labels.tolist())
        ]

    def __call__(self, image: Image.Image) -> list[Detection]:
        """The detections of one image (see [`detect`] for a batch)."""
        return self.detect([image])[0]
