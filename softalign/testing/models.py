"""Tiny random scorer models built offline, saved as the local directories the real ones come in.

`tiny_mask2former` is a `Mask2FormerForUniversalSegmentation` with COCO's 80 labels; `tiny_clip` a `CLIPModel`
with the offline CLIP tokenizer and a CLIP image-processor config. Both have the real classes and file layouts,
so `from_pretrained` on their directories takes the same path as on real weights.
"""

from __future__ import annotations

import os

import torch

from .tokenizers import clip_tokenizer


def tiny_mask2former(path: str | os.PathLike | None = None, id2label: dict | None = None, seed: int = 0, **overrides):
    """A Mask2Former instance-segmentation model (Swin backbone, 6 queries, 80 labels); saved to `path` if given.

    Args:
        path (`str` or `os.PathLike`, *optional*): directory to `save_pretrained` into.
        id2label (`dict`, *optional*): label names (default: COCO's spelling, `mouse`, `remote`, `keyboard`).
        seed (`int`, *optional*): weight initialisation seed.
        overrides: `Mask2FormerConfig` fields.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from ..eval.coco import GENEVAL_CLASSES

    coco = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
    if id2label is None:
        id2label = {i: coco.get(name, name) for i, name in enumerate(GENEVAL_CLASSES)}
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    settings = dict(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=6,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**settings)).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def tiny_clip(path: str | os.PathLike | None = None, seed: int = 0, dim: int = 32, projection: int = 16, image_size=32):
    """A `CLIPModel` (2 text and 2 vision layers), its offline tokenizer and a CLIP image-processor config.

    Returns `(model, tokenizer)`; with `path`, the three are saved there as a real CLIP directory is.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer()
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    vision = dict(
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).eval()
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(path)
    return model, tokenizer


def tiny_blip(path: str | os.PathLike | None = None, seed: int = 0, image_size: int = 32):
    """A `BlipForImageTextRetrieval` (2 + 2 layers) with a word-level `BertTokenizer`; saved to `path` if given.

    Returns `(model, tokenizer)`.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    words = "a an the photo of on in and two three cat cats dog dogs park mat red blue circle square".split()
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = BertTokenizer(vocab=vocab)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        bos_token_id=2,
        sep_token_id=3,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(
        BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    ).eval()
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return model, tokenizer
