"""open_clip ViT checkpoints (HPSv2 / v2.1's `HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) -> `CLIPModel`.

open_clip's `CLIP` and transformers' `CLIPModel` are the same network with different names: open_clip packs the
attention's q, k, v into one `in_proj_weight` and stores the projections as `(width, dim)` matrices that are
multiplied from the right, transformers' `Linear` layers hold them transposed. The conversion is only renaming,
splitting and transposing (tested by a round trip on a tiny model; a comparison with open_clip itself needs
open_clip and the real weights). The architecture (width, layers, heads, GELU, the text pooling at the end-of-text
token) comes from a CLIP directory of the same shape, e.g. `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` for HPSv2, whose
tokenizer and processor files are copied along.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..eval.local import local_dir, read_config, require_model_type

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_PLAIN = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_IGNORED = {"attn_mask"}


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose) an open_clip ViT `CLIP` state dict into `CLIPModel`'s keys.

    Raises:
        `ValueError`: a key that is not part of open_clip's ViT CLIP (e.g. a CoCa or custom-text-tower checkpoint).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _IGNORED:
            continue
        if key in _PLAIN:
            out[_PLAIN[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = re.fullmatch(
            r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)", key
        )
        if match is None:
            raise ValueError(f"open_clip key {key!r} is not part of a ViT CLIP; expected open_clip's CLIP state dict")
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        part, kind = match.group(3), match.group(4)
        if kind.startswith("in_proj"):
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{kind.removeprefix('in_proj_')}"] = chunk.contiguous()
            continue
        if part == "attn" and kind in ("weight", "bias"):
            raise ValueError(f"open_clip key {key!r}: unexpected attention parameter")
        if part not in _BLOCK:
            raise ValueError(f"open_clip key {key!r} is not part of a ViT CLIP block; expected {sorted(_BLOCK)}")
        out[f"{prefix}{_BLOCK[part]}.{kind}"] = value
    return out


def convert_open_clip_checkpoint(
    checkpoint: str | os.PathLike, base_clip: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Write a `CLIPModel` directory with an open_clip checkpoint's weights (e.g. HPSv2 into CLIP-ViT-H-14's shape).

    Args:
        checkpoint (`str` or `os.PathLike`): the open_clip `.pt` / `.pth` (a state dict, or `{"state_dict": ...}`),
            read with `weights_only=True`.
        base_clip (`str` or `os.PathLike`): a local `CLIPModel` directory with the same architecture; its config,
            tokenizer and processor files are copied.
        out (`str` or `os.PathLike`): the directory to write.

    Raises:
        `ValueError`: the checkpoint's keys or shapes do not fit the base architecture.
    """
    from transformers import CLIPConfig, CLIPModel

    base = local_dir(base_clip, "convert_open_clip_checkpoint", "a CLIPModel directory of the checkpoint's shape")
    require_model_type(base, read_config(base), ("clip",), "convert_open_clip_checkpoint")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"convert_open_clip_checkpoint: {checkpoint} does not exist; expected an open_clip .pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    model = CLIPModel(CLIPConfig.from_pretrained(base, local_files_only=True))
    converted = open_clip_to_transformers(state)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if converted[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{checkpoint} does not fit {base}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]}; expected an open_clip checkpoint of the base CLIP's architecture"
        )
    model.load_state_dict(converted, strict=False)
    out = Path(out)
    model.save_pretrained(out)
    for item in base.iterdir():
        if item.name not in ("config.json",) and not item.name.startswith(("model", "pytorch_model")):
            if item.is_file():
                shutil.copy2(item, out / item.name)
    return out
