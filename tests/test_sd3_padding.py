"""The collapsed zero-padding processor computes exactly what the stock SD3 transformer computes with 256 zero rows."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from softalign.sd3_padding import CollapsedPaddingAttnProcessor, collapse_zero_padding, restore_attention


def tiny_transformer(**overrides):
    torch.manual_seed(0)
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12,
        pos_embed_max_size=8,
    )
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_one_zero_row_with_log_repeats_equals_the_stock_256_rows(qk_norm):
    transformer = tiny_transformer(qk_norm=qk_norm)
    latents, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 12)
    clip = torch.randn(2, 5, 16)
    timestep = torch.tensor([300.0, 800.0])

    def run(context):
        return transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=context, pooled_projections=pooled
        ).sample

    with torch.no_grad():
        stock = run(torch.cat([clip, torch.zeros(2, 256, 16)], dim=1))
        collapse_zero_padding(transformer, 256)
        collapsed = run(torch.cat([clip, torch.zeros(2, 1, 16)], dim=1))
        restore_attention(transformer)
        restored = run(torch.cat([clip, torch.zeros(2, 256, 16)], dim=1))
        wrong = run(torch.cat([clip, torch.zeros(2, 1, 16)], dim=1))  # one row WITHOUT the correction
    assert torch.allclose(collapsed, stock, atol=1e-5)
    assert torch.equal(restored, stock)
    assert not torch.allclose(wrong, stock, atol=1e-3)  # the log(256) bias is what makes them equal


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="repeats"):
        CollapsedPaddingAttnProcessor(0)
    with pytest.raises(ValueError, match="dual attention"):
        collapse_zero_padding(tiny_transformer(dual_attention_layers=(0,)))
