"""ImageReward (Xu et al. 2023, arXiv:2304.05977) on transformers' BLIP, from its released checkpoint.

ImageReward is BLIP (a ViT-L/16 image encoder at 224 px and a BERT text encoder with cross-attention to the image
tokens) and an MLP head. Its `score` (THUDM/ImageReward, `ImageReward.py`):

1. the image: resize the short side to 224 (bicubic), centre crop, CLIP's mean / std; -> image tokens;
2. the prompt: BERT tokens padded to 35, `[CLS]` first; the text encoder attends to the image tokens;
3. `reward = (mlp(cls_state) - 0.16717362830052426) / 1.0333394966054072`; the MLP has the LAION aesthetic
   predictor's layout (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations).

Here the BLIP is `transformers.BlipForImageTextRetrieval` (its `vision_model` and `text_encoder`, the same networks
under other names); [`convert_image_reward_checkpoint`] renames `ImageReward.pt` into a directory it loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..eval.local import local_dir, read_config, require_model_type
from .clip_core import pil_pixels, tensor_pixels
from .contract import Scorer
from .scorers import AestheticHead

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35
HEAD_FILE, SETTINGS_FILE = "image_reward_head.safetensors", "image_reward.json"

_VISION = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
]


def image_reward_to_transformers(state_dict: dict) -> tuple[dict, dict]:
    """Split an ImageReward state dict into `BlipForImageTextRetrieval` keys and the head's keys.

    BLIP parts that ImageReward's score does not use (projections, momentum encoders, queues) are dropped.

    Raises:
        `ValueError`: a vision-encoder key outside BLIP's ViT, or no encoder / head keys at all.
    """
    blip, head = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        elif key.startswith("blip.text_encoder."):
            blip["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION:
                if re.fullmatch(pattern, rest):
                    blip["vision_model." + re.sub(pattern, replacement, rest)] = value
                    break
            else:
                raise ValueError(
                    f"ImageReward key {key!r} is not part of BLIP's ViT; expected {[p for p, _ in _VISION]}"
                )
    if (
        not head
        or not any(k.startswith("vision_model.") for k in blip)
        or not any(k.startswith("text_encoder.") for k in blip)
    ):
        raise ValueError(
            "not an ImageReward state dict: expected 'blip.visual_encoder.*', 'blip.text_encoder.*' and 'mlp.*' keys"
        )
    return blip, head


def convert_image_reward_checkpoint(
    checkpoint: str | os.PathLike, base_blip: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Write a directory [`ImageReward.from_pretrained`] loads, from `ImageReward.pt`.

    Args:
        checkpoint (`str` or `os.PathLike`): ImageReward's `ImageReward.pt` (read with `weights_only=True`).
        base_blip (`str` or `os.PathLike`): a local `BlipForImageTextRetrieval` directory of BLIP-large's shape
            (e.g. `Salesforce/blip-itm-large-coco`) with a BERT tokenizer; its config is used at ImageReward's
            224 px (read from the checkpoint's position embeddings) with BLIP's ViT layer-norm epsilon (1e-6), its
            tokenizer files are copied.
        out (`str` or `os.PathLike`): the directory to write.
    """
    from safetensors.torch import save_file
    from transformers import BlipConfig, BlipForImageTextRetrieval

    base = local_dir(base_blip, "convert_image_reward_checkpoint", "a BlipForImageTextRetrieval directory")
    require_model_type(base, read_config(base), ("blip",), "convert_image_reward_checkpoint")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"convert_image_reward_checkpoint: {checkpoint} does not exist; expected ImageReward.pt"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    blip_state, head_state = image_reward_to_transformers(state.get("state_dict", state))
    config = BlipConfig.from_pretrained(base, local_files_only=True)
    positions = blip_state["vision_model.embeddings.position_embedding"].shape[1]
    config.vision_config.image_size = int(round((positions - 1) ** 0.5)) * config.vision_config.patch_size
    config.vision_config.layer_norm_eps = 1e-6  # BLIP's ViT (`partial(nn.LayerNorm, eps=1e-6)`), not 1e-5
    model = BlipForImageTextRetrieval(config)
    expected = model.state_dict()
    wrong = sorted(k for k, v in blip_state.items() if k not in expected or expected[k].shape != v.shape)
    missing = sorted(k for k in expected if k.startswith(("vision_model.", "text_encoder.")) and k not in blip_state)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if wrong or missing:
        raise ValueError(
            f"{checkpoint} does not fit {base}: unknown or mis-shaped {wrong[:5]}, missing {missing[:5]}; expected "
            "a BLIP of ImageReward's architecture (BLIP-large)"
        )
    model.load_state_dict(blip_state, strict=False)
    out = Path(out)
    model.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in head_state.items()}, str(out / HEAD_FILE))
    settings = {"mean": MEAN, "std": STD, "max_length": MAX_LENGTH, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    for item in base.iterdir():
        if item.is_file() and ("tokenizer" in item.name or item.name in ("vocab.txt", "special_tokens_map.json")):
            shutil.copy2(item, out / item.name)
    return out


class ImageReward(Scorer):
    """ImageReward's score over a converted directory ([`convert_image_reward_checkpoint`]).

    Args:
        model (`transformers.BlipForImageTextRetrieval`): the BLIP.
        tokenizer: its BERT tokenizer.
        head (`AestheticHead`): the MLP (the aesthetic predictor's layout, on the 768-d `[CLS]` state).
        settings (`dict`, *optional*): `mean`, `std`, `max_length`, `image_mean`, `image_std` (ImageReward's).
    """

    name = "imagereward"

    def __init__(self, model, tokenizer, head: AestheticHead, settings: dict | None = None):
        settings = {"mean": MEAN, "std": STD, "max_length": MAX_LENGTH, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                    **(settings or {})}  # fmt: skip
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.head = head.to(next(model.parameters()).device)
        self.settings = settings
        self.image_size = model.config.vision_config.image_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, torch_dtype: torch.dtype | None = None):
        """Load a converted ImageReward directory (BLIP `config.json` + weights, tokenizer, the head and
        `image_reward.json`); never downloads."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        expected = f"an ImageReward directory written by convert_image_reward_checkpoint ({HEAD_FILE}, {SETTINGS_FILE})"
        folder = local_dir(path, "ImageReward", expected)
        require_model_type(folder, read_config(folder), ("blip",), "ImageReward")
        for name in (HEAD_FILE, SETTINGS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"ImageReward: {folder / name} is missing; expected {expected}")
        model = BlipForImageTextRetrieval.from_pretrained(
            folder, local_files_only=True, **({"dtype": torch_dtype} if torch_dtype else {})
        )
        if device is not None:
            model.to(device)
        head_state = load_file(str(folder / HEAD_FILE))
        head = AestheticHead(dim=head_state["layers.0.weight"].shape[1])
        head.load_state_dict(head_state)
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        return cls(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), head, settings)

    @property
    def device(self) -> torch.device:
        """Where the BLIP model's weights live."""
        return next(self.model.parameters()).device

    def rewards_from_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Steps 2-3 on normalised `(B, 3, 224, 224)` pixels."""
        dtype = next(self.model.parameters()).dtype
        image_embeds = self.model.vision_model(pixel_values=pixels.to(self.device, dtype)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.settings["max_length"],
            return_tensors="pt",
        ).to(self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.model.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        features = text.last_hidden_state[:, 0, :].float()
        return (self.head(features) - self.settings["mean"]) / self.settings["std"]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable ImageReward scores `(B,)` of images in [0, 1] for their prompts."""
        pixels = tensor_pixels(images, self.image_size, self.settings["image_mean"], self.settings["image_std"])
        return self.rewards_from_pixels(pixels, prompts)

    def metric_scores(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """ImageReward scores `(B,)` of PIL images for their prompts."""
        pixels = pil_pixels(images, self.image_size, self.settings["image_mean"], self.settings["image_std"])
        return self.rewards_from_pixels(pixels, prompts)
