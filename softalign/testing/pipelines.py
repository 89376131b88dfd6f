"""Tiny, offline, in-process diffusers pipelines of the families softalign supports.

They are the real pipeline and model classes with small configurations (as in diffusers' own pipeline tests), so
every code path is the one a real SD1.5 / SDXL / SD3 checkpoint takes. Tokenizers are built locally
(`tokenizers.py`), nothing is downloaded.
"""

from __future__ import annotations

import torch

from ..families import FAMILY_TABLE, get_family
from .tokenizers import clip_tokenizer, t5_tokenizer


def tiny_pipeline(family: str, seed: int = 0, **overrides):
    """Build a tiny pipeline of `family` with freshly initialised weights (seeded).

    Args:
        family (`str`): `"sd15"` (`StableDiffusionPipeline`), `"sdxl"` (`StableDiffusionXLPipeline`), `"sd3"` or
            `"sd35"` (`StableDiffusion3Pipeline`; SD3.5 with qk RMS norm and dual attention) or `"flux"`
            (`FluxPipeline`, guidance-distilled like FLUX.1 [dev]).
        seed (`int`, *optional*, defaults to 0): seed of the weight initialisation.
        overrides: denoiser config values. The text encoders follow the context width, so real-size context dims
            work while the rest stays small: `cross_attention_dim=768` (SD1.5), `cross_attention_dim=2048` (SDXL),
            `caption_projection_dim=1536, num_layers=5` (SD3),
            `num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096, num_layers=1` (FLUX.1).

    Example:
        ```py
        >>> from softalign.testing import tiny_pipeline
        >>> pipe = tiny_pipeline("sd15")
        >>> image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images[0]
        ```
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    torch.manual_seed(seed)
    pipe = _BUILDERS[get_family(family).tiny](dict(overrides))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as `from_pretrained` leaves them: no dropout (T5 has 0.1 by default)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_config(hidden: int, projection: int | None = None, layers: int = 2):
    from transformers import CLIPTextConfig

    vocab = len(clip_tokenizer())
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4 if hidden % 4 == 0 else 1,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def _unet_vae(latent_channels: int = 4, **settings):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **settings,
    )


def _unet(config: dict, **family_defaults):
    from diffusers import UNet2DConditionModel

    settings = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    settings.update(family_defaults)
    settings.update(config)
    return UNet2DConditionModel(**settings)


def _tiny_unet(config: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = _unet(config)
    return StableDiffusionPipeline(
        vae=_unet_vae(),
        text_encoder=CLIPTextModel(_clip_config(unet.config.cross_attention_dim)),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_unet_xl(config: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    width = config.get("cross_attention_dim", 32)
    if width % 2:
        raise ValueError(f"SDXL cross_attention_dim must be even (two text encoders), got {width}.")
    pooled = 16
    unet = _unet(
        config,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # as SDXL: the first level has no cross-attention
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled + 6 * 8,
        transformer_layers_per_block=(1, 2),
    )
    return StableDiffusionXLPipeline(
        vae=_unet_vae(),
        text_encoder=CLIPTextModel(_clip_config(width // 2)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(width // 2, projection=pooled)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )


def _tiny_t5(width: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=width,
            d_ff=2 * width,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _flow_vae(latent_channels: int, **constants):
    """The VAE layout of the flow families (no quant convs), with the family's shift and scaling constants."""
    return _unet_vae(latent_channels, use_quant_conv=False, use_post_quant_conv=False, **constants)


def _tiny_mmdit(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip_width, pooled_each = 16, 16
    settings = dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=6,  # the official 5 soft-token layers fit, and one block stays plain
        attention_head_dim=8,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=2 * pooled_each,
        pos_embed_max_size=32,
    )
    settings.update(config)
    settings.setdefault("num_attention_heads", settings["caption_projection_dim"] // settings["attention_head_dim"])
    if settings["num_attention_heads"] * settings["attention_head_dim"] != settings["caption_projection_dim"]:
        raise ValueError(
            "SD3 needs num_attention_heads * attention_head_dim == caption_projection_dim, got "
            f"{settings['num_attention_heads']} * {settings['attention_head_dim']} != {settings['caption_projection_dim']}."
        )
    transformer = SD3Transformer2DModel(**settings)
    t5_tok = t5_tokenizer()
    t5 = _tiny_t5(settings["joint_attention_dim"], len(t5_tok))  # the pipeline pads the CLIP context to the T5 width
    vae = _flow_vae(settings["in_channels"], shift_factor=0.0609, scaling_factor=1.5035)  # SD3's VAE constants
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip_width, projection=pooled_each)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_width, projection=pooled_each)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def _tiny_mmdit_35(config: dict):
    """SD3.5: the SD3 classes with RMS-normalised q and k, and dual attention in the first blocks (SD3.5 Medium)."""
    return _tiny_mmdit({"dual_attention_layers": (0, 1), "qk_norm": "rms_norm", **config})


def _tiny_flux(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    latent_channels = 4
    settings = dict(
        patch_size=1,
        in_channels=4 * latent_channels,  # packed 2 x 2 patches of the VAE latents
        num_layers=6,  # the default 5 soft-token layers fit, and one double-stream block stays plain
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,  # as FLUX.1 [dev]
    )
    settings.update(config)
    head = settings["attention_head_dim"]
    settings.setdefault("axes_dims_rope", (16, 56, 56) if head == 128 else (2, 2, head - 4))  # sums to the head dim
    transformer = FluxTransformer2DModel(**settings)
    t5_tok = t5_tokenizer()
    return FluxPipeline(
        transformer=transformer,
        # FLUX.1 [dev]'s scheduler config: resolution-dependent (dynamic) shifting
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_flow_vae(latent_channels, shift_factor=0.1159, scaling_factor=0.3611),  # FLUX.1's VAE constants
        text_encoder=CLIPTextModel(_clip_config(settings["pooled_projection_dim"])),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_t5(settings["joint_attention_dim"], len(t5_tok)),
        tokenizer_2=t5_tok,
    )


_BUILDERS = {  # keyed by `Family.tiny`
    "unet": _tiny_unet,
    "unet_xl": _tiny_unet_xl,
    "mmdit": _tiny_mmdit,
    "mmdit_35": _tiny_mmdit_35,
    "mmdit_rope": _tiny_flux,
}
FAMILIES = tuple(name for name, entry in FAMILY_TABLE.items() if entry.tiny in _BUILDERS)
