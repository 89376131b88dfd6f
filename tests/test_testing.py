import pytest
import torch

from softalign.testing import clip_tokenizer, t5_tokenizer, tiny_pipeline


def test_clip_tokenizer_gives_the_real_clip_ids():
    tokenizer = clip_tokenizer()
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[1:-1] == [320, 1125, 539, 320, 2368]  # OpenAI CLIP's ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]) == "a photo of a cat"


def test_tokenizers_round_trip_through_save_pretrained(tmp_path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_tokenizer().save_pretrained(tmp_path / "clip")
    assert (
        CLIPTokenizer.from_pretrained(tmp_path / "clip")("two red circles").input_ids
        == clip_tokenizer()("two red circles").input_ids
    )
    t5_tokenizer().save_pretrained(tmp_path / "t5")
    reloaded = T5TokenizerFast.from_pretrained(tmp_path / "t5")
    ids = reloaded("a photo of a cat").input_ids
    assert ids == t5_tokenizer()("a photo of a cat").input_ids and ids[-1] == 1 and 2 not in ids


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_tiny_pipelines_generate_deterministically_and_save_and_load(family, tmp_path):
    pipe = tiny_pipeline(family)
    call = dict(prompt="a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    first = pipe(**call, generator=torch.Generator().manual_seed(1)).images
    second = pipe(**call, generator=torch.Generator().manual_seed(1)).images
    assert first.shape == (1, 32, 32, 3) and (first == second).all()
    pipe.save_pretrained(tmp_path / "model")
    reloaded = type(pipe).from_pretrained(tmp_path / "model")
    reloaded.set_progress_bar_config(disable=True)
    # Weights come back bit-identical; loaded (memory-mapped) buffers may take another BLAS path, so allow 1e-5.
    assert abs(reloaded(**call, generator=torch.Generator().manual_seed(1)).images - first).max() < 1e-5


def test_tiny_families_are_detected_with_their_traits():
    from softalign.families import family_of

    sd35 = tiny_pipeline("sd35").transformer
    assert family_of(sd35) == "sd35" and sd35.config.qk_norm == "rms_norm" and sd35.config.dual_attention_layers
    assert family_of(tiny_pipeline("sd3")) == "sd3"
    flux = tiny_pipeline("flux")
    assert (
        family_of(flux) == "flux" and type(flux).__name__ == "FluxPipeline" and flux.transformer.config.guidance_embeds
    )
    assert flux.scheduler.config.use_dynamic_shifting


def test_overrides_reach_real_context_widths():
    assert tiny_pipeline("sd15", cross_attention_dim=768).text_encoder.config.hidden_size == 768
    sdxl = tiny_pipeline("sdxl", cross_attention_dim=2048)
    assert sdxl.unet.config.cross_attention_dim == 2048
    assert sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size == 2048
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_pipeline("kandinsky")
    with pytest.raises(ValueError, match="num_attention_heads \\* attention_head_dim == caption_projection_dim"):
        tiny_pipeline("sd3", caption_projection_dim=36)
