"""Reward and metric models for text-to-image post-training and evaluation, from local weights only.

Each [`Scorer`] serves three uses: a DDPO / TRL `reward_fn(images, prompts, metadata) -> (rewards, info)`,
a differentiable `score(images, prompts)` on `(B, 3, H, W)` tensors in [0, 1], and an evaluation `metric` on PIL
images. The contract, and adapters for users' point-wise and group-wise rewards, are in [`as_reward_fn`]'s module
(`softalign.rewards.contract`); the formulas and their sources in `softalign.rewards.scorers`. The shapes-world
rewards of `softalign.rl.rewards` are re-exported here.
"""

from ..rl.rewards import GenEvalReward, dense_score, jpeg_compressibility, to_pil_images
from .clip_core import CLIPCore
from .contract import Scorer, as_reward_fn, to_tensor_images
from .convert import convert_open_clip_checkpoint, open_clip_to_transformers
from .image_reward import ImageReward, convert_image_reward_checkpoint, image_reward_to_transformers
from .scorers import (
    AestheticHead,
    AestheticScore,
    CLIPScore,
    HPSv2,
    PickScore,
    aesthetic_score,
    clip_score,
    cosine,
    hps_score,
    pick_score,
)

__all__ = [
    "AestheticHead",
    "AestheticScore",
    "CLIPCore",
    "CLIPScore",
    "GenEvalReward",
    "HPSv2",
    "ImageReward",
    "PickScore",
    "Scorer",
    "aesthetic_score",
    "as_reward_fn",
    "clip_score",
    "convert_image_reward_checkpoint",
    "convert_open_clip_checkpoint",
    "cosine",
    "dense_score",
    "hps_score",
    "image_reward_to_transformers",
    "jpeg_compressibility",
    "open_clip_to_transformers",
    "pick_score",
    "to_pil_images",
    "to_tensor_images",
]
