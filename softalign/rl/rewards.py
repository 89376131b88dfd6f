"""Rewards with DDPO's contract (TRL's too): `reward_fn(images, prompts, metadata) -> (rewards[B], info)`.

`images` are a float tensor `(B, 3, H, W)` in [0, 1] (or a list of PIL images), `prompts` and `metadata` tuples with
one entry per image; `metadata` carries each prompt's GenEval line (what `prompt_fn` returned with it).

- [`GenEvalReward`]: GenEval's verdict of each image under a detector (exact: 1 or 0), or a dense variant that gives
  partial credit (count error, colour and relation shares) so that the policy gradient has a slope to follow.
- [`jpeg_compressibility`]: minus the JPEG size in kB (offline; DDPO's compressibility task).

Any other reward plugs in with the same signature. For a model with local weights (CLIP score, PickScore, an
aesthetic predictor), load it once outside and close over it::

    model, processor = CLIPModel.from_pretrained("path/to/clip"), CLIPProcessor.from_pretrained("path/to/clip")

    def clip_score(images, prompts, metadata):
        inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        return out.logits_per_image.diagonal() / 100, {}
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from ..eval.rules import GENEVAL, evaluate_detections, relative_position, select_objects


def to_pil_images(images) -> list[Image.Image]:
    """`(B, 3, H, W)` float tensor in [0, 1], `(B, H, W, 3)` array, or PIL images -> list of RGB PIL images."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        return [image.convert("RGB") for image in images]
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}.")
        array = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    else:
        array = np.asarray(images)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"Expected images of shape (B, H, W, 3), got {array.shape}.")
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def _metadata_line(metadata, prompt: str) -> dict:
    line = metadata.get("geneval", metadata) if isinstance(metadata, dict) else None
    if not isinstance(line, dict) or "include" not in line or "tag" not in line:
        raise ValueError(
            f"GenEvalReward needs each prompt's GenEval metadata (with 'tag' and 'include'), got {metadata!r} for "
            f"prompt {prompt!r}; return it from prompt_fn as the metadata."
        )
    return line


def dense_score(detections, metadata: dict) -> float:
    """Partial credit in [0, 1]: for each include clause, `1 - |found - count| / count` for the confident detections
    of its class (capped below at 0), times the share of found objects with the asked colour and the share of
    (A, B) pairs in the asked relation; averaged over clauses; an exclude clause that fails halves the score."""
    objects = select_objects(detections, metadata["tag"], GENEVAL)
    scores, found_by_clause = [], []
    for clause in metadata["include"]:
        found = objects.get(clause["class"], [])
        count = int(clause["count"])
        score = max(0.0, 1.0 - abs(len(found) - count) / count)
        chosen = found[:count]
        found_by_clause.append(chosen)
        if "color" in clause and chosen:
            score *= sum(d.color == clause["color"] for d in chosen) / len(chosen)
        elif "color" in clause:
            score = 0.0
        if "position" in clause:
            relation, target = clause["position"]
            pairs = [(a, b) for a in chosen for b in found_by_clause[target]]
            score *= sum(relation in relative_position(a.box, b.box) for a, b in pairs) / len(pairs) if pairs else 0.0
        scores.append(score)
    total = sum(scores) / len(scores)
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], [])) >= int(clause["count"]):
            total *= 0.5
    return total


class GenEvalReward:
    """GenEval-rule reward on generated images.

    Args:
        detector (`Detector`, *optional*): image -> detections with calibrated scores; defaults to the shapes-world
            detector shipped with softalign.
        dense (`bool`, *optional*, defaults to `False`): 1/0 verdicts (`False`) or [`dense_score`] partial credit.

    `info` holds `correct` (the exact verdicts) whatever the variant, so training curves can show accuracy.
    """

    def __init__(self, detector=None, dense: bool = False):
        if detector is None:
            from ..shapes.detector import ShapesDetector

            detector = ShapesDetector.load()
        self.detector = detector
        self.dense = dense

    def __call__(self, images, prompts, metadata) -> tuple[torch.Tensor, dict]:
        """trl's reward contract: `(images (B, 3, H, W) in [0, 1], prompts, metadata) -> (rewards (B,), info)`."""
        pil = to_pil_images(images)
        if not len(pil) == len(prompts) == len(metadata):
            raise ValueError(f"Got {len(pil)} images, {len(prompts)} prompts and {len(metadata)} metadata entries.")
        rewards, correct = [], []
        for image, prompt, meta in zip(pil, prompts, metadata, strict=True):
            line = _metadata_line(meta, prompt)
            detections = self.detector(image)
            verdict, _, _ = evaluate_detections(detections, line)
            correct.append(float(verdict))
            rewards.append(dense_score(detections, line) if self.dense else float(verdict))
        return torch.tensor(rewards, dtype=torch.float32), {"correct": torch.tensor(correct)}


def jpeg_compressibility(images, prompts=None, metadata=None, quality: int = 95) -> tuple[torch.Tensor, dict]:
    """Minus the JPEG size of each image in kB (DDPO's compressibility reward)."""
    sizes = []
    for image in to_pil_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    rewards = -torch.tensor(sizes, dtype=torch.float32)
    if not torch.isfinite(rewards).all() or math.isnan(float(rewards.sum())):
        raise ValueError("jpeg_compressibility produced a non-finite reward.")
    return rewards, {}
