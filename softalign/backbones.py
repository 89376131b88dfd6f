"""The one place that knows the model families: which denoiser a pipeline has and what its context looks like."""

from __future__ import annotations

from torch import nn

UNET_FAMILIES = ("sd15", "sd2", "sdxl")
FAMILIES = UNET_FAMILIES + ("sd3",)


def denoiser_of(pipe_or_denoiser) -> nn.Module:
    """The denoiser of a pipeline (`pipe.unet` or `pipe.transformer`), or the argument itself if it is a denoiser."""
    if _is_unet(pipe_or_denoiser) or _is_mmdit(pipe_or_denoiser):
        return pipe_or_denoiser
    for name in ("unet", "transformer"):
        denoiser = getattr(pipe_or_denoiser, name, None)
        if denoiser is not None:
            if not (_is_unet(denoiser) or _is_mmdit(denoiser)):
                raise ValueError(
                    f"pipe.{name} is a {type(denoiser).__name__}; softalign supports UNet2DConditionModel "
                    "(SD1.x/2.x, SDXL) and SD3Transformer2DModel (SD3, SD3.5)."
                )
            return denoiser
    raise ValueError(
        f"Expected a diffusers pipeline with a `unet` or `transformer`, or one of those models, "
        f"got {type(pipe_or_denoiser).__name__}."
    )


def family_of(pipe_or_denoiser) -> str:
    """`"sd15"`, `"sd2"`, `"sdxl"` or `"sd3"`, read from the denoiser's config (SD2.x: 1024-wide context)."""
    denoiser = denoiser_of(pipe_or_denoiser)
    if _is_mmdit(denoiser):
        return "sd3"
    if getattr(denoiser.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if denoiser.config.cross_attention_dim == 1024 else "sd15"


def architecture_of(pipe_or_denoiser) -> str:
    return "mmdit" if _is_mmdit(denoiser_of(pipe_or_denoiser)) else "unet"


def context_dim_of(pipe_or_denoiser) -> int:
    """Width of the context the soft tokens join: cross-attention dim (UNet) or caption projection dim (MMDiT)."""
    denoiser = denoiser_of(pipe_or_denoiser)
    if _is_mmdit(denoiser):
        return int(denoiser.config.caption_projection_dim)
    dim = denoiser.config.cross_attention_dim
    if not isinstance(dim, int):
        raise ValueError(f"UNet cross_attention_dim {dim!r} varies per block; softalign needs one context width.")
    return dim


def _is_unet(module) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(module, UNet2DConditionModel)


def _is_mmdit(module) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(module, SD3Transformer2DModel)
