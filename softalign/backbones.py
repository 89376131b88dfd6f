"""The one place that knows the model families: which denoiser a pipeline has and what its context looks like."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .sd3_padding import STOCK_T5_ROWS, CollapsedPadding, install_collapsed_padding, is_null_t5, null_t5_bypassed

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


# -- training-time view of a pipeline ------------------------------------------------------------------------------
class Backbone:
    """What a trainer needs from a pipeline, for one family: encode captions and images, noise, call the denoiser.

    Captions go through the pipeline's own `encode_prompt` and images through its VAE, so the conditioning is exactly
    what `pipe(prompt)` uses; the denoiser is called through its public forward.
    """

    family: str
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    conditioning_layout = "stock"  # part of the encoding cache's key when encode_prompts differs from the pipeline's

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = denoiser_of(pipe)
        self.family = family_of(pipe)
        config = pipe.scheduler.config
        if self.family == "sd3":
            self.prediction_type, self.alphas_cumprod = "flow", None
        else:
            self.prediction_type = config.get("prediction_type", "epsilon")
            self.alphas_cumprod = _alphas_cumprod(pipe.scheduler)

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self):
        return next(self.denoiser.parameters()).dtype

    def encode_image_moments(self, pixels):
        """VAE posterior mean and std of images in [-1, 1] `(B, 3, H, W)`, shifted and scaled like the pipeline's
        latents: a latent sample is `mean + std * noise` (the official code samples the posterior)."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = vae.config.scaling_factor
        return ((posterior.mean - shift) * scale).float().cpu(), (posterior.std * scale).float().cpu()

    def encode_prompts(self, captions: list[str]) -> dict:
        raise NotImplementedError

    def predict(self, noisy, timesteps, conditioning: dict):
        raise NotImplementedError


class UNetBackbone(Backbone):
    """SD1.x / SD2.x: one CLIP text encoder, `unet(x_t, t, encoder_hidden_states)`."""

    def encode_prompts(self, captions):
        import torch

        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                list(captions), self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"prompt_embeds": embeds}

    def predict(self, noisy, timesteps, conditioning):
        return self.denoiser(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample


class SDXLBackbone(Backbone):
    """SDXL: two CLIP encoders; the UNet also takes the pooled embedding and the size/crop `time_ids`."""

    def encode_prompts(self, captions):
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, noisy, timesteps, conditioning):
        import torch

        # (original size, crop top-left, target size) of a centre-cropped square at the training resolution.
        side = noisy.shape[-1] * self.pipe.vae_scale_factor
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=noisy.device, dtype=noisy.dtype)
        added = {
            "text_embeds": conditioning["pooled_prompt_embeds"],
            "time_ids": time_ids.expand(noisy.shape[0], -1),
        }
        return self.denoiser(
            noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"], added_cond_kwargs=added
        ).sample


class SD3Backbone(Backbone):
    """SD3 / SD3.5: three text encoders; a flow model called with t in [0, 1000] and the pooled projection.

    Without T5 (or with a null T5) the stock pipeline appends 256 zero rows to the CLIP context; here they are one
    row standing for 256 (`softalign.sd3_padding`: the same outputs, a much cheaper step on small images).
    """

    def __init__(self, pipe):
        super().__init__(pipe)
        self.collapsed_padding = is_null_t5(getattr(pipe, "text_encoder_3", None)) and install_collapsed_padding(
            self.denoiser
        )
        if self.collapsed_padding:
            self.conditioning_layout = f"sd3-zero-rows-collapsed-{STOCK_T5_ROWS}"

    def encode_prompts(self, captions):
        import torch

        rows = {"max_sequence_length": 1} if self.collapsed_padding else {}
        with torch.no_grad(), null_t5_bypassed(self.pipe):
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(captions),
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                **rows,
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, noisy, timesteps, conditioning):
        timesteps = timesteps.to(noisy.dtype).reshape(-1).expand(noisy.shape[0])
        context = conditioning["prompt_embeds"]
        extra = {}
        if self.collapsed_padding:
            extra["joint_attention_kwargs"] = {"collapsed_padding": collapsed_row(self.pipe, context.shape[1])}
        return self.denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=context,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            **extra,
        ).sample


def collapsed_row(pipe, text_rows: int) -> CollapsedPadding:
    """Where the collapsed zero row sits in each block's context: the last text row, which is row `text_rows - 1`
    unless soft tokens are prepended to the text (then it is the context's last row)."""
    from .injection import injection_of  # injection builds on this module

    injection = injection_of(pipe)
    prepended = injection is not None and injection.soft_tokens.config.position == "prepend"
    return CollapsedPadding(STOCK_T5_ROWS, -1 if prepended else text_rows - 1)


@contextmanager
def collapsed_generation(pipe):
    """Yields extra `pipe(...)` arguments that draw the same images faster on an SD3 pipeline without T5 or with a
    null T5 (`{}` for any other pipeline): one zero row instead of 256, with its attention weight corrected."""
    if (
        family_of(pipe) != "sd3"
        or not is_null_t5(pipe.text_encoder_3)
        or not install_collapsed_padding(pipe.transformer)
    ):
        yield {}
        return
    text_rows = pipe.tokenizer_max_length + 1
    with null_t5_bypassed(pipe):
        yield {
            "max_sequence_length": 1,
            "joint_attention_kwargs": {"collapsed_padding": collapsed_row(pipe, text_rows)},
        }


def backbone_for(pipe) -> Backbone:
    """The [`Backbone`] of a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline`."""
    family = family_of(pipe)
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "vae", None) is None:
        raise ValueError(f"Expected a diffusers text-to-image pipeline with a VAE, got {type(pipe).__name__}.")
    return {"sd15": UNetBackbone, "sd2": UNetBackbone, "sdxl": SDXLBackbone, "sd3": SD3Backbone}[family](pipe)


def _alphas_cumprod(scheduler):
    import torch

    values = getattr(scheduler, "alphas_cumprod", None)
    if values is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; SoftAlign needs a DDPM-family schedule.")
    return torch.as_tensor(values, dtype=torch.float32)
