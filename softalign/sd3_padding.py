"""Exact, cheap stand-in for the block of identical zero rows an SD3 pipeline without T5 feeds its transformer.

`StableDiffusion3Pipeline` with `text_encoder_3=None` appends `max_sequence_length` (256) zero rows to the CLIP
context. Those rows are identical, so they stay identical through every joint block (same input, same per-token ops,
same attention query), and in attention n identical keys with identical values act as one key whose logit is raised
by ln(n). A transformer fed ONE zero row, with ln(256) added to that row's attention logit, therefore computes what
the stock pipeline computes with 256 rows (to float rounding), at a fraction of the cost when the image is small: the
shipped 64-pixel SD3 model sees 64 image tokens, so 344 joint tokens become 89 and a training step is 4x cheaper.
(At 1024 pixels the 4096 image tokens dominate and the saving is a few percent.)

The processor computes diffusers' stock joint attention unless a forward passes
`joint_attention_kwargs={"collapsed_padding": CollapsedPadding(...)}`, which gradient checkpointing replays too.
A "null T5" (a `T5EncoderModel` whose final layer norm has zero weight, so every output row is exactly 0) counts as no
T5: a pipeline can then be loaded without arguments by `from_pretrained` and still be conditioned on CLIP alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STOCK_T5_ROWS = 256  # zero rows `StableDiffusion3Pipeline` appends without T5 (its default max_sequence_length)


@dataclass(frozen=True)
class CollapsedPadding:
    """One context row of each joint attention stands for `repeats` identical rows.

    Args:
        repeats (`int`): how many identical rows it replaces.
        row (`int`): its index in every block's context, counted from the start, or negative from the end.
    """

    repeats: int = STOCK_T5_ROWS
    row: int = -1

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"CollapsedPadding.repeats must be at least 1, got {self.repeats}")


class CollapsedPaddingAttnProcessor:
    """SD3 joint attention (diffusers' `JointAttnProcessor2_0` computation) with an optional collapsed context row.

    Args:
        default ([`CollapsedPadding`], *optional*): used when a forward passes none; `None` means stock attention.
    """

    def __init__(self, default: CollapsedPadding | None = None):
        self.default = default

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, collapsed_padding=None, **kwargs
    ):
        """The joint attention with the collapsed zero row standing for `rows` rows."""
        if encoder_hidden_states is None:
            raise ValueError("CollapsedPaddingAttnProcessor is for joint attention; it got no context tokens")
        padding = collapsed_padding or self.default
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x, norm):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = torch.cat(
            [
                heads(attn.to_q(hidden_states), attn.norm_q),
                heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
            ],
            dim=2,
        )
        key = torch.cat(
            [
                heads(attn.to_k(hidden_states), attn.norm_k),
                heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
            ],
            dim=2,
        )
        value = torch.cat(
            [heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2
        )
        bias = None
        if padding is not None:
            context_rows = encoder_hidden_states.shape[1]
            if not -context_rows <= padding.row < context_rows:
                raise ValueError(f"CollapsedPadding.row {padding.row} is outside a context of {context_rows} rows")
            bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
            bias[image_tokens + padding.row % context_rows] = math.log(padding.repeats)
            bias = bias.view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1]).to(query.dtype)
        image_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, context_out


def is_null_t5(text_encoder_3) -> bool:
    """True when the third text encoder contributes only zero rows: absent, or a T5 whose final norm weight is 0."""
    if text_encoder_3 is None:
        return True
    norm = getattr(getattr(text_encoder_3, "encoder", None), "final_layer_norm", None)
    return norm is not None and not bool(norm.weight.detach().abs().sum())


@contextmanager
def null_t5_bypassed(pipe):
    """Within the block a null T5 is hidden from the pipeline, which then makes the zero rows itself (the same values,
    without running T5 or warning that `max_sequence_length` truncates the T5 prompt). The config is not touched."""
    encoder = getattr(pipe, "text_encoder_3", None)
    if encoder is None or not is_null_t5(encoder):
        yield
        return
    object.__setattr__(pipe, "text_encoder_3", None)  # DiffusionPipeline.__setattr__ would rewrite the config
    try:
        yield
    finally:
        object.__setattr__(pipe, "text_encoder_3", encoder)


def install_collapsed_padding(transformer, default: CollapsedPadding | None = None) -> bool:
    """Put [`CollapsedPaddingAttnProcessor`] on every joint attention of an `SD3Transformer2DModel`.

    Only over diffusers' stock processors (a custom one, e.g. IP-Adapter's, is never replaced) and only for SD3-style
    blocks (SD3.5's dual attention is not handled). Returns whether it is installed.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if getattr(transformer.config, "dual_attention_layers", ()):
        return False
    processors = transformer.attn_processors.values()
    if not all(isinstance(p, (JointAttnProcessor2_0, CollapsedPaddingAttnProcessor)) for p in processors):
        return False
    transformer.set_attn_processor(CollapsedPaddingAttnProcessor(default))
    return True


def collapse_zero_padding(transformer, repeats: int = STOCK_T5_ROWS) -> None:
    """Every forward of the transformer treats its LAST context row as `repeats` copies (a training script's set-up:
    feed the CLIP context and ONE zero row). Undo with [`restore_attention`]."""
    if not install_collapsed_padding(transformer, CollapsedPadding(repeats, -1)):
        raise ValueError(
            "collapse_zero_padding needs an SD3 transformer with diffusers' stock joint attention and no dual attention "
            "layers (SD3, not SD3.5)"
        )


def restore_attention(transformer) -> None:
    """Back to diffusers' stock joint attention (the processor an SD3 transformer is built with)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
