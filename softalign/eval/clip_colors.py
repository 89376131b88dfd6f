"""GenEval's colour classifier over `transformers.CLIPModel`: zero-shot over its 10 colours on the masked crop.

GenEval (`evaluation/evaluate_images.py`, with `clip_benchmark`'s zero-shot classifier over open_clip ViT-L-14):
1. the crop: the object's mask over a flat `#999` grey, cut to its box ([`masked_crop`]);
2. per object class, one weight vector per colour: the mean of the L2-normalised text embeddings of three
   templates, `a photo of a {color} {class}`, `a photo of a {color}-colored {class}` and `a photo of a {color}
   object` (always "a", also before "orange"), normalised again;
3. the colour is the argmax of `100 * normalise(image embedding) @ weights`.

Differences: the original runs open_clip's ViT-L-14 (OpenAI weights) under CUDA autocast; here any local
`CLIPModel` (e.g. `openai/clip-vit-large-patch14`, the same weights) in the dtype it was loaded in.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image

from .detections import COLORS, Detection, masked_crop

TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}", "a photo of a {color} object")


class CLIPColorClassifier:
    """A [`ColorClassifier`] as GenEval's; `classify` names the colours of several objects in one forward pass.

    Args:
        core (`CLIPCore`): the CLIP model, tokenizer and transform.
        colors (`tuple[str, ...]`, *optional*, defaults to GenEval's ten): the candidate colours.
        background (`str`, *optional*, defaults to `"#999"`): the grey behind the mask.
        batch_size (`int`, *optional*, defaults to 16): crops per forward pass (GenEval's).
    """

    def __init__(self, core, colors: tuple[str, ...] = COLORS, background: str = "#999", batch_size: int = 16):
        self.core = core
        self.colors = tuple(colors)
        self.background = background
        self.batch_size = batch_size
        self._weights: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device=None, torch_dtype: torch.dtype | None = None, **kwargs
    ) -> CLIPColorClassifier:
        """Load a local CLIP directory through the shared [`CLIPCore`] cache (e.g. `openai/clip-vit-large-patch14`)."""
        from ..rewards.clip_core import CLIPCore

        return cls(CLIPCore.from_pretrained(path, device=device, torch_dtype=torch_dtype), **kwargs)

    @torch.no_grad()
    def weights(self, name: str) -> torch.Tensor:
        """`(D, n_colors)` zero-shot weights for objects of class `name` (cached per class, as GenEval)."""
        if name not in self._weights:
            columns = []
            for color in self.colors:
                texts = [template.format(color=color, name=name) for template in TEMPLATES]
                embedding = F.normalize(self.core.text_embeds(texts), dim=-1).mean(dim=0)
                columns.append(embedding / embedding.norm())
            self._weights[name] = torch.stack(columns, dim=1)
        return self._weights[name]

    @torch.no_grad()
    def logits(self, image: Image.Image, detections: list[Detection]) -> torch.Tensor:
        """`(n, n_colors)` GenEval logits (`100 * cos`) of each detection's masked crop."""
        out = []
        for start in range(0, len(detections), self.batch_size):
            chunk = detections[start : start + self.batch_size]
            crops = [masked_crop(image, d, background=self.background) for d in chunk]
            features = F.normalize(self.core.image_embeds(self.core.pil_pixels(crops)), dim=-1)
            weights = torch.cat([self.weights(d.label).unsqueeze(0) for d in chunk])  # (n, D, colors)
            out.append(100.0 * torch.einsum("nd,ndc->nc", features, weights))
        return torch.cat(out) if out else torch.zeros(0, len(self.colors))

    def classify(self, image: Image.Image, detections: list[Detection]) -> list[str]:
        """The colour of each detection, batched."""
        if not detections:
            return []
        return [self.colors[i] for i in self.logits(image, detections).argmax(dim=1).tolist()]

    def __call__(self, image: Image.Image, detection: Detection) -> str:
        """The colour of one detected object (see [`classify`] for many at once)."""
        return self.classify(image, [detection])[0]
