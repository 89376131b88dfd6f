"""Collapsed zero padding computes what the stock SD3 transformer computes with 256 zero rows, wherever it is used."""

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
from softalign.families import backbone_for, collapsed_generation, context_dim_of
from softalign.sd3_padding import (
    CollapsedPadding,
    collapse_zero_padding,
    install_collapsed_padding,
    is_null_t5,
    restore_attention,
)
from softalign.testing import tiny_pipeline


def tiny_transformer(**overrides):
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        pos_embed_max_size=8,
    )
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


def without_t5(pipe, null: bool = False):
    """The pipeline with no T5, or (null=True) with a null T5: its final norm zeroed, so every output row is 0."""
    if null:
        with torch.no_grad():
            pipe.text_encoder_3.encoder.final_layer_norm.weight.zero_()
        return pipe
    return StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_one_zero_row_with_log_repeats_equals_the_stock_256_rows(qk_norm):
    transformer = tiny_transformer(qk_norm=qk_norm)
    latents, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 12)
    clip = torch.randn(2, 5, 16)
    timestep = torch.tensor([300.0, 800.0])

    def run(context, **kwargs):
        return transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=context, pooled_projections=pooled, **kwargs
        ).sample

    with torch.no_grad():
        stock = run(torch.cat([clip, torch.zeros(2, 256, 16)], dim=1))
        collapse_zero_padding(transformer, 256)
        collapsed = run(torch.cat([clip, torch.zeros(2, 1, 16)], dim=1))
        restore_attention(transformer)
        restored = run(torch.cat([clip, torch.zeros(2, 256, 16)], dim=1))
        wrong = run(torch.cat([clip, torch.zeros(2, 1, 16)], dim=1))  # one row WITHOUT the correction
        # installed without a default it is stock attention until a forward asks; the row may be given from the start
        assert install_collapsed_padding(transformer)
        unasked = run(torch.cat([clip, torch.zeros(2, 256, 16)], dim=1))
        asked = run(
            torch.cat([clip, torch.zeros(2, 1, 16)], dim=1),
            joint_attention_kwargs={"collapsed_padding": CollapsedPadding(256, row=5)},
        )
    assert torch.allclose(collapsed, stock, atol=1e-5) and torch.allclose(asked, stock, atol=1e-5)
    assert torch.equal(restored, stock) and torch.allclose(unasked, stock, atol=1e-6)
    assert not torch.allclose(wrong, stock, atol=1e-3)  # the log(256) bias is what makes them equal


@pytest.mark.parametrize("objective", [None, "agsm", "softrepa"])  # no tokens, appended tokens, prepended tokens
def test_backbone_without_t5_predicts_what_the_stock_context_gives(objective):
    pipe = without_t5(tiny_pipeline("sd3"), null=objective == "softrepa")
    if objective is not None:
        config = SoftTokensConfig.for_family("sd3", dim=context_dim_of(pipe), objective=objective, n_layers=1)
        attach_soft_tokens(pipe, SoftTokens(config))
    backbone = backbone_for(pipe)
    assert backbone.collapsed_padding
    conditioning = backbone.encode_prompts(["a photo of two dogs", "a cat"])
    assert not backbone_for(tiny_pipeline("sd3")).collapsed_padding  # a real T5 is left alone
    stock_embeds, _, _, _ = pipe.encode_prompt(
        ["a photo of two dogs", "a cat"], None, None, do_classifier_free_guidance=False
    )
    rows = pipe.tokenizer_max_length
    assert conditioning["prompt_embeds"].shape[1] == rows + 1 and stock_embeds.shape[1] == rows + 256
    assert torch.equal(conditioning["prompt_embeds"], stock_embeds[:, : rows + 1])
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 750.0])
    with torch.no_grad():
        ours = backbone.predict(noisy, t, conditioning)
        stock = pipe.transformer(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=stock_embeds,
            pooled_projections=conditioning["pooled_prompt_embeds"],
        ).sample
    assert torch.allclose(ours, stock, atol=1e-5)


@pytest.mark.parametrize("null", [False, True])
def test_collapsed_generation_draws_the_stock_images_and_applies_only_without_t5(null, caplog):
    for other in (tiny_pipeline("sd3"), tiny_pipeline("sd15")):
        with collapsed_generation(other) as kwargs:
            assert kwargs == {}
    pipe = without_t5(tiny_pipeline("sd3"), null=null)
    assert is_null_t5(pipe.text_encoder_3) and backbone_for(pipe).collapsed_padding

    def draw(**extra):
        return pipe(
            ["two cats", "a dog"],
            num_inference_steps=3,
            guidance_scale=3.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **extra,
        ).images

    stock = draw()  # a null T5 runs over 256 positions and returns zeros
    diffusers_logging.enable_propagation()  # so caplog sees diffusers' warnings
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # whatever an earlier import set (e.g. DIFFUSERS_VERBOSITY)
    try:
        with collapsed_generation(pipe) as kwargs:
            assert kwargs["max_sequence_length"] == 1
            fast = draw(**kwargs)
        assert "truncated" not in caplog.text  # the null T5 is bypassed, not asked for one position
        if null:  # the warning it would give otherwise (so the check above can fail)
            pipe.encode_prompt(["two cats"], None, None, do_classifier_free_guidance=False, max_sequence_length=1)
            assert "truncated" in caplog.text
    finally:
        diffusers_logging.disable_propagation()
        diffusers_logging.set_verbosity(verbosity)
    assert torch.allclose(fast, stock, atol=1e-5)
    if null:  # put back, and the pipeline's config still names it
        assert pipe.text_encoder_3 is not None and pipe.config.text_encoder_3[0] is not None


def test_custom_processors_are_kept_and_bad_arguments_named():
    transformer = tiny_transformer()

    class Custom:  # any processor that is not diffusers' stock one
        def __call__(self, *args, **kwargs):
            raise AssertionError("not called")

    transformer.set_attn_processor(Custom())
    assert not install_collapsed_padding(transformer)
    with pytest.raises(ValueError, match="stock joint attention"):
        collapse_zero_padding(transformer)
    with pytest.raises(ValueError, match="repeats"):
        CollapsedPadding(0)
    assert not install_collapsed_padding(tiny_transformer(dual_attention_layers=(0,)))


class PlainJointAttention:
    """diffusers' stock joint attention behind a class softalign does not recognise: the 256-row path stays."""

    def __init__(self):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.inner = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def test_trainers_on_a_t5_less_pipeline_match_the_stock_256_row_path(tmp_path):
    from rl_fixtures import brightness, tiny_ddpo_config
    from shapes_data import shapes_pairs

    from softalign.rl.ddpo_trainer import DDPOTrainer
    from softalign.softalign_config import SoftAlignConfig
    from softalign.softalign_trainer import SoftAlignTrainer

    runs = {}
    for collapsed in (True, False):
        pipe = without_t5(tiny_pipeline("sd3"))
        if not collapsed:
            pipe.transformer.set_attn_processor(PlainJointAttention())
        args = SoftAlignConfig(output_dir=str(tmp_path / f"s{collapsed}"), max_steps=2, resolution=32, save_steps=0)
        align = SoftAlignTrainer(pipe, args, shapes_pairs(8))
        assert align.backbone.collapsed_padding == collapsed
        align.train()
        ddpo = DDPOTrainer(
            tiny_ddpo_config(str(tmp_path / f"d{collapsed}"), num_epochs=1),
            brightness,
            lambda: ("a photo of two dogs", {}),
            pipe,
            soft_tokens=align.soft_tokens,
        )
        runs[collapsed] = (align.state.log_history, ddpo.train())
    (align_fast, ddpo_fast), (align_stock, ddpo_stock) = runs[True], runs[False]
    for fast, stock in zip(align_fast, align_stock, strict=True):
        assert fast["loss"] == pytest.approx(stock["loss"], rel=1e-4)
    assert ddpo_fast[0]["reward_mean"] == pytest.approx(ddpo_stock[0]["reward_mean"], rel=1e-4)


def test_a_pipeline_saved_without_t5_loads_through_softalign(tmp_path):
    from softalign import load_pipeline

    without_t5(tiny_pipeline("sd3")).save_pretrained(tmp_path / "no-t5")
    pipe = load_pipeline(str(tmp_path / "no-t5"))  # plain DiffusionPipeline.from_pretrained refuses the null T5
    assert pipe.text_encoder_3 is None and backbone_for(pipe).collapsed_padding
