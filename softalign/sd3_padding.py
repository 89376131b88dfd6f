"""Exact, cheap stand-in for the block of identical zero tokens an SD3 pipeline without T5 feeds its transformer.

`StableDiffusion3Pipeline` with `text_encoder_3=None` appends `max_sequence_length` (256) zero rows to the CLIP
context. Those rows are identical, so they stay identical through every joint block (same input, same per-token ops,
same attention query), and in attention n identical keys with identical values act as one key whose logit is raised
by ln(n). A transformer fed ONE zero row, with ln(256) added to that row's attention logit, therefore computes what
the stock pipeline computes with 256 rows, at a fraction of the cost (the shapes SD3 model sees 64 image tokens: 344
joint tokens become 89). Training scripts use this; the exported model is used with the stock pipeline unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CollapsedPaddingAttnProcessor:
    """SD3 joint attention whose LAST context token stands for `repeats` identical tokens."""

    def __init__(self, repeats: int):
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CollapsedPaddingAttnProcessor is for joint attention; it got no context tokens")
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x, norm):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = torch.cat(
            [heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)],
            dim=2,
        )
        key = torch.cat(
            [heads(attn.to_k(hidden_states), attn.norm_k), heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)],
            dim=2,
        )
        value = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1]).to(query.dtype)
        image_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, context_out


def collapse_zero_padding(transformer, repeats: int = 256) -> None:
    """Make every joint attention of an `SD3Transformer2DModel` treat its last context token as `repeats` copies.

    Feed it the CLIP context followed by ONE zero row (instead of `repeats`); undo with `restore_attention(transformer)`.
    """
    if getattr(transformer.config, "dual_attention_layers", ()):
        raise ValueError("collapse_zero_padding supports SD3 transformers without dual attention layers (SD3, not SD3.5)")
    transformer.set_attn_processor(CollapsedPaddingAttnProcessor(repeats))


def restore_attention(transformer) -> None:
    """Back to diffusers' stock joint attention (the processor an SD3 transformer is built with)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
