"""CLIP-based reward and metric models: CLIPScore, PickScore, HPSv2 / v2.1 and the LAION aesthetic predictor.

Every formula is a pure function of embeddings (pinned by tests on hand-made vectors); `v` is the projected image
embedding, `t` the projected text embedding, `cos = <v, t> / (|v| |t|)`:

| scorer | formula | source |
|---|---|---|
| CLIPScore | `max(100 * cos, 0)` | Hessel et al. 2021, arXiv:2104.08718 (`w * max(cos, 0)`, w = 2.5 there; 100 as torchmetrics' `CLIPScore`) |
| PickScore | `exp(logit_scale) * cos` | Kirstain et al. 2023, arXiv:2305.01569; the PickScore_v1 model card's inference code |
| HPSv2 / v2.1 | `cos` | Wu et al. 2023, arXiv:2306.09341; `hpsv2.score`: the diagonal of `normalise(v) @ normalise(t).T` |
| aesthetic | `head(v / |v|)` | LAION's improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): an MLP without activations (768 -> 1024 -> 128 -> 64 -> 16 -> 1) on the L2-normalised CLIP ViT-L/14 image embedding; or the v1 linear head |

Weights: CLIPScore over any CLIP (the papers use `openai/clip-vit-large-patch14` or ViT-B/32); PickScore over
`yuvalkirstain/PickScore_v1` (a `CLIPModel`; its processor is `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s); HPSv2
over its open_clip ViT-H-14 checkpoint converted to a `CLIPModel` directory ([`convert_open_clip_checkpoint`]);
the aesthetic head from its `.pth` over CLIP ViT-L/14.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .clip_core import CLIPCore
from .contract import Scorer


def cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of `(B, D)` image and `(B, D)` text embeddings -> `(B,)`."""
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(dim=-1)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """CLIPScore: `max(scale * cos, 0)`."""
    return torch.clamp(scale * cosine(image_embeds, text_embeds), min=0)


def pick_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """PickScore: `exp(logit_scale) * cos` (`logit_scale` is the model's log temperature, ~4.6 -> x100)."""
    return logit_scale.exp() * cosine(image_embeds, text_embeds)


def hps_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """HPSv2 / v2.1: `cos` (typical values 0.2-0.3)."""
    return cosine(image_embeds, text_embeds)


class _CLIPTextImage(Scorer):
    """A score of (image, prompt) pairs from one CLIP core."""

    def __init__(self, core: CLIPCore):
        self.core = core

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a local CLIP directory through the shared [`CLIPCore`] cache (loaded once per directory)."""
        return cls(CLIPCore.from_pretrained(path, device=device, torch_dtype=torch_dtype), **kwargs)

    def formula(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable in `images` (`(B, 3, H, W)` in [0, 1])."""
        image_embeds = self.core.image_embeds(self.core.tensor_pixels(images))
        with torch.no_grad():
            text_embeds = self.core.text_embeds(list(prompts))
        return self.formula(image_embeds, text_embeds)

    def metric_scores(self, images, prompts: Sequence[str]) -> torch.Tensor:
        return self.formula(self.core.image_embeds(self.core.pil_pixels(images)), self.core.text_embeds(list(prompts)))


class CLIPScore(_CLIPTextImage):
    """CLIPScore `max(100 * cos, 0)` (arXiv:2104.08718), over a local CLIP directory.

    Args:
        core (`CLIPCore`): the CLIP model (see [`CLIPCore.from_pretrained`]).
        scale (`float`, *optional*, defaults to 100): 100 as torchmetrics; 2.5 gives the paper's CLIP-S.

    Example:

    ```python
    >>> scorer = CLIPScore.from_pretrained("models/clip-vit-large-patch14")
    >>> rewards, info = scorer(images, prompts, metadata)  # a DDPO reward_fn
    ```
    """

    name = "clip"

    def __init__(self, core: CLIPCore, scale: float = 100.0):
        super().__init__(core)
        self.scale = scale

    def formula(self, image_embeds, text_embeds):
        """[`clip_score`] of the embeddings."""
        return clip_score(image_embeds, text_embeds, self.scale)


class PickScore(_CLIPTextImage):
    """PickScore `exp(logit_scale) * cos` (arXiv:2305.01569), over a local copy of `yuvalkirstain/PickScore_v1`
    with the CLIP-H processor files."""

    name = "pickscore"

    def formula(self, image_embeds, text_embeds):
        """[`pick_score`] with the model's own logit scale."""
        return pick_score(image_embeds, text_embeds, self.core.model.logit_scale.detach().float())


class HPSv2(_CLIPTextImage):
    """Human Preference Score v2 / v2.1 `cos` (arXiv:2306.09341), over its open_clip checkpoint converted to a
    `CLIPModel` directory with [`convert_open_clip_checkpoint`] (no open_clip needed)."""

    name = "hps"

    def formula(self, image_embeds, text_embeds):
        """[`hps_score`] of the embeddings."""
        return hps_score(image_embeds, text_embeds)


class AestheticHead(torch.nn.Module):
    """LAION's aesthetic head: the improved predictor's activation-free MLP (`layers.{0,2,4,6,7}` keys) or the v1
    linear head (`weight`, `bias`) over an L2-normalised CLIP image embedding."""

    def __init__(self, dim: int = 768, linear: bool = False):
        super().__init__()
        if linear:
            self.layers = torch.nn.Sequential(torch.nn.Linear(dim, 1))
        else:
            drop = torch.nn.Dropout
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(dim, 1024), drop(0.2), torch.nn.Linear(1024, 128), drop(0.2),
                torch.nn.Linear(128, 64), drop(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
            )  # fmt: skip
        self.eval().requires_grad_(False)

    def forward(self, normalised_embeds: torch.Tensor) -> torch.Tensor:
        """The head's score `(B,)` of L2-normalised CLIP image embeddings."""
        return self.layers(normalised_embeds).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AestheticHead:
        """Read `sac+logos+ava1-l14-linearMSE.pth` (or the v1 `sa_0_4_vit_l_14_linear.pth`, or a `.safetensors`
        of either); `.pth` files are read with `weights_only=True`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"aesthetic head: {path} does not exist; expected LAION's sac+logos+ava1-l14-linearMSE.pth "
                "(improved aesthetic predictor) or sa_0_4_vit_l_14_linear.pth"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if set(state) == {"weight", "bias"}:
            head = cls(dim=state["weight"].shape[1], linear=True)
            head.layers[0].load_state_dict(state)
            return head
        expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(
                f"{path}: keys {sorted(state)[:6]}... are not an aesthetic head; expected {sorted(expected)}"
            )
        head = cls(dim=state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head


def aesthetic_score(image_embeds: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """`head(v / |v|)` -> `(B,)`, LAION's 1-10 aesthetic rating."""
    return head(F.normalize(image_embeds, dim=-1))


class AestheticScore(Scorer):
    """The LAION aesthetic predictor over CLIP ViT-L/14 (text-free: prompts are ignored).

    Args:
        core (`CLIPCore`): CLIP ViT-L/14 (`openai/clip-vit-large-patch14`).
        head (`AestheticHead`): the head, see [`AestheticHead.from_file`].
    """

    name = "aesthetic"
    needs_prompts = False

    def __init__(self, core: CLIPCore, head: AestheticHead):
        dim = core.model.config.projection_dim
        if head.layers[0].in_features != dim:
            raise ValueError(
                f"the aesthetic head takes {head.layers[0].in_features}-d embeddings, the CLIP gives {dim}"
            )
        self.core = core
        self.head = head.to(core.device)

    @classmethod
    def from_pretrained(cls, clip_path, head_path, device=None, torch_dtype=None) -> AestheticScore:
        """CLIP directory (shared through the [`CLIPCore`] cache) and the head's weights file."""
        return cls(CLIPCore.from_pretrained(clip_path, device, torch_dtype), AestheticHead.from_file(head_path))

    def score(self, images: torch.Tensor, prompts: Sequence[str] = ()) -> torch.Tensor:
        """Differentiable aesthetic scores `(B,)` of images in [0, 1] (prompts are ignored)."""
        return aesthetic_score(self.core.image_embeds(self.core.tensor_pixels(images)), self.head)

    def metric_scores(self, images, prompts: Sequence[str] = ()) -> torch.Tensor:
        """Aesthetic scores `(B,)` of PIL images (prompts are ignored)."""
        return aesthetic_score(self.core.image_embeds(self.core.pil_pixels(images)), self.head)
