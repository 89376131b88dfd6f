"""The one place that knows the model families: what a family is, and the training-time view of its pipeline.

A family entry ([`Family`]) says how to recognise the denoiser, how wide its context is, which injection layout
its soft tokens use (`injection.py` holds the layouts), the papers' presets (SoftAlign defaults and soft-token
configurations per objective), and which [`Backbone`] encodes captions and images, noises latents, computes the
regression target and calls the denoiser. Adding a family (FLUX, ...) is one entry in `FAMILY_TABLE`, its
`Backbone` if the existing ones do not fit, and its injection layout; no other module names a family.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .sd3_padding import STOCK_T5_ROWS, CollapsedPadding, install_collapsed_padding, is_null_t5, null_t5_bypassed

# The attribute under which `injection.py` records the injection attached to a denoiser (read here by duck typing, so
# this module stays below `injection.py`).
INJECTION_ATTRIBUTE = "_softalign_injection"


@dataclass(frozen=True)
class Family:
    """What softalign knows about one model family.

    Args:
        name (`str`): the family id, e.g. `"sd15"`.
        architecture (`str`): the injection layout, `"unet"` (cross-attention blocks), `"mmdit"` (joint blocks) or
            `"mmdit_rope"` (joint blocks behind rotary position ids: token slots reserved once, FLUX.1).
        pipeline_class (`str`): the diffusers pipeline class of the family.
        context_dim (`int`): the released checkpoints' context width (cross-attention / caption projection dim).
        backbone (`str`): name of the [`Backbone`] class that drives its pipeline in training.
        training_defaults (`dict`): the papers' [`SoftAlignConfig`] values (`gamma_neg`, `dweight`, `resolution`).
        soft_tokens (`dict`): per objective (`"agsm"`, `"softrepa"`), the [`SoftTokensConfig`] settings of the
            official training scripts.
        tiny (`str`, *optional*): which tiny in-process pipeline `softalign.testing` builds for the family.
        variant_of (`str`, *optional*): the family whose token layout and released tokens this one shares (SD3.5 of
            SD3): shapes alone cannot tell them apart, so a released `.pth` file is read as the original family's.
    """

    name: str
    architecture: str
    pipeline_class: str
    context_dim: int
    backbone: str
    training_defaults: dict = field(default_factory=dict)
    soft_tokens: dict = field(default_factory=dict)
    tiny: str | None = None
    variant_of: str | None = None


_SD1_TOKENS = {  # AGSM scripts/train_coco.sh and SoftREPA run_train.sh for SD1.x/2.x: null-prompt initialisation
    "agsm": {"unet_blocks": ["down", "mid"], "init": "null_prompt"},
    "softrepa": {"unet_blocks": ["down"], "init": "null_prompt"},
}
FAMILY_TABLE: dict[str, Family] = {
    "sd15": Family(
        "sd15", "unet", "StableDiffusionPipeline", 768, "UNetBackbone",
        {"gamma_neg": 1.0, "dweight": 10.0, "resolution": 512}, _SD1_TOKENS, tiny="unet",
    ),
    "sd2": Family(
        "sd2", "unet", "StableDiffusionPipeline", 1024, "UNetBackbone",
        {"gamma_neg": 1.0, "dweight": 10.0, "resolution": 768}, _SD1_TOKENS,
    ),
    "sdxl": Family(
        "sdxl", "unet", "StableDiffusionXLPipeline", 2048, "SDXLBackbone",
        {"gamma_neg": 0.1, "dweight": 10.0, "resolution": 1024},
        {"agsm": {"unet_blocks": ["down", "mid"]}, "softrepa": {"unet_blocks": ["down", "mid"]}},
        tiny="unet_xl",
    ),
    "sd3": Family(
        "sd3", "mmdit", "StableDiffusion3Pipeline", 1536, "SD3Backbone",
        {"gamma_neg": 0.1, "dweight": 0.0, "resolution": 1024},
        {"agsm": {"n_layers": 5, "position": "append"}, "softrepa": {"n_layers": 5, "position": "prepend"}},
        tiny="mmdit",
    ),
    # SD3.5 Medium / Large: the same classes and token layout as SD3, with qk RMS norm (and, for Medium, dual attention
    # in the first blocks). Its own entry so that detection, presets and reports name it; no paper gives SD3.5
    # numbers, so the presets are SD3's. Large is 2432 wide (38 heads of 64); the width here is Medium's.
    "sd35": Family(
        "sd35", "mmdit", "StableDiffusion3Pipeline", 1536, "SD3Backbone",
        {"gamma_neg": 0.1, "dweight": 0.0, "resolution": 1024},
        {"agsm": {"n_layers": 5, "position": "append"}, "softrepa": {"n_layers": 5, "position": "prepend"}},
        tiny="mmdit_35", variant_of="sd3",
    ),
    # FLUX.1 [dev] / [schnell]: 19 double-stream and 38 single-stream blocks, 3072 wide, rotary position ids. No paper
    # trains soft tokens on FLUX; the presets follow SD3's (5 layers, AGSM appends, SoftREPA prepends).
    "flux": Family(
        "flux", "mmdit_rope", "FluxPipeline", 3072, "FluxBackbone",
        {"gamma_neg": 0.1, "dweight": 0.0, "resolution": 1024},
        {"agsm": {"n_layers": 5, "position": "append"}, "softrepa": {"n_layers": 5, "position": "prepend"}},
        tiny="mmdit_rope",
    ),
}  # fmt: skip
FAMILIES = tuple(FAMILY_TABLE)
UNET_FAMILIES = tuple(name for name, entry in FAMILY_TABLE.items() if entry.architecture == "unet")


def get_family(name: str) -> Family:
    """The [`Family`] entry of `name`; a `ValueError` lists the known families otherwise."""
    if name not in FAMILY_TABLE:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {name!r}.")
    return FAMILY_TABLE[name]


def families_with(architecture: str) -> tuple[str, ...]:
    """The families whose soft tokens use the injection layout `architecture` (`"unet"`, `"mmdit"`, `"mmdit_rope"`)."""
    return tuple(name for name, entry in FAMILY_TABLE.items() if entry.architecture == architecture)


def family_for_tokens(shape: tuple[int, ...], family: str | None = None, source: str = "tokens") -> str:
    """The family of released soft tokens of `shape` (the `.pth` files carry no family).

    `(banks, n, D)` tokens are for a UNet family, `(banks, layers, n, D)` for an MMDiT one. With `family` given it is
    checked against the layout and the width `D`; without it, the one family of that layout and width is returned (a
    `ValueError` names the candidates when there is none). Released 4-d tokens are SD3's (no paper released any for
    a variant such as SD3.5 or for FLUX.1): pass `family` for others.
    """
    shape = tuple(shape)
    architecture, dim = ("mmdit" if len(shape) == 4 else "unet"), shape[-1]
    if family is not None:
        entry = get_family(family)
        if (entry.architecture == "unet") != (architecture == "unet"):  # both MMDiT layouts hold 4-d tokens
            found = "per-layer (MMDiT)" if architecture == "mmdit" else "for a UNet"
            raise ValueError(f"{source}: tokens of shape {shape} are {found}, not {family.upper()}.")
        if architecture == "unet" and entry.context_dim != dim:
            raise ValueError(
                f"{source}: tokens of shape {shape} have width {dim}, but {family} has context width "
                f"{entry.context_dim}."
            )
        return family
    candidates = tuple(name for name in families_with(architecture) if FAMILY_TABLE[name].variant_of is None)
    if architecture == "unet":
        candidates = tuple(name for name in candidates if FAMILY_TABLE[name].context_dim == dim)
    if len(candidates) != 1:
        widths = {FAMILY_TABLE[name].context_dim: name for name in families_with(architecture)}
        raise ValueError(
            f"{source}: cannot infer the model family from width {dim} (known: {widths}); pass family= (--family)."
        )
    return candidates[0]


def soft_token_preset(family: str, objective: str) -> dict:
    """[`SoftTokensConfig`] settings of the official training scripts for `objective` on `family`.

    `"diffusion"` (the plain fine-tuning baseline) takes AGSM's layout with one bank, so that it trains the same
    tokens as the objective it is the baseline of.
    """
    entry = get_family(family)
    if objective not in ("agsm", "softrepa", "diffusion"):
        raise ValueError(f"objective must be 'agsm', 'softrepa' or 'diffusion', got {objective!r}.")
    settings = {"architecture": entry.architecture, "dim": entry.context_dim, "family": family}
    settings["n_banks"] = 2 if objective == "agsm" else 1
    layout = entry.soft_tokens.get("agsm" if objective == "diffusion" else objective, {})
    settings.update({k: list(v) if isinstance(v, list) else v for k, v in layout.items()})
    return settings


def training_defaults(family: str) -> dict:
    """The papers' [`SoftAlignConfig`] values for `family` (METHOD.md sections 3-4)."""
    return dict(get_family(family).training_defaults)


def denoiser_of(pipe_or_denoiser) -> nn.Module:
    """The denoiser of a pipeline (`pipe.unet` or `pipe.transformer`), or the argument itself if it is a denoiser."""
    if _is_denoiser(pipe_or_denoiser):
        return pipe_or_denoiser
    for name in ("unet", "transformer"):
        denoiser = getattr(pipe_or_denoiser, name, None)
        if denoiser is not None:
            if not _is_denoiser(denoiser):
                raise ValueError(
                    f"pipe.{name} is a {type(denoiser).__name__}; softalign supports UNet2DConditionModel "
                    "(SD1.x/2.x, SDXL), SD3Transformer2DModel (SD3, SD3.5) and FluxTransformer2DModel (FLUX.1)."
                )
            return denoiser
    raise ValueError(
        f"Expected a diffusers pipeline with a `unet` or `transformer`, or one of those models, "
        f"got {type(pipe_or_denoiser).__name__}."
    )


def family_of(pipe_or_denoiser) -> str:
    """The family id (`"sd15"`, `"sd2"`, `"sdxl"`, `"sd3"`, `"sd35"` or `"flux"`), read from the denoiser's config:
    SD2.x has a 1024-wide context, SDXL the `text_time` embedding, SD3.5 normalises q and k (SD3 does not)."""
    denoiser = denoiser_of(pipe_or_denoiser)
    if _is_flux(denoiser):
        return "flux"
    if _is_mmdit(denoiser):
        sd35 = denoiser.config.qk_norm is not None or bool(denoiser.config.dual_attention_layers)
        return "sd35" if sd35 else "sd3"
    if getattr(denoiser.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if denoiser.config.cross_attention_dim == 1024 else "sd15"


def architecture_of(pipe_or_denoiser) -> str:
    """The injection layout of the denoiser: `"unet"`, `"mmdit"` or `"mmdit_rope"`."""
    denoiser = denoiser_of(pipe_or_denoiser)
    if _is_flux(denoiser):
        return "mmdit_rope"
    return "mmdit" if _is_mmdit(denoiser) else "unet"


def context_dim_of(pipe_or_denoiser) -> int:
    """Width of the context the soft tokens join: cross-attention dim (UNet), caption projection dim (SD3) or the
    inner width the `context_embedder` projects T5 into (FLUX.1: heads x head dim)."""
    denoiser = denoiser_of(pipe_or_denoiser)
    if _is_flux(denoiser):
        return int(denoiser.config.num_attention_heads * denoiser.config.attention_head_dim)
    if _is_mmdit(denoiser):
        return int(denoiser.config.caption_projection_dim)
    dim = denoiser.config.cross_attention_dim
    if not isinstance(dim, int):
        raise ValueError(f"UNet cross_attention_dim {dim!r} varies per block; softalign needs one context width.")
    return dim


def _is_denoiser(module) -> bool:
    return _is_unet(module) or _is_mmdit(module) or _is_flux(module)


def _is_flux(module) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(module, FluxTransformer2DModel)


def _is_unet(module) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(module, UNet2DConditionModel)


def base_model_record(pipe_or_denoiser) -> dict:
    """What an adapter records about the model it was trained on (as PEFT's `base_model_name_or_path`): the
    pipeline's `name_or_path` when it has one, its class, and a hash of the denoiser's config."""
    import hashlib
    import json

    denoiser = denoiser_of(pipe_or_denoiser)
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    owner = pipe_or_denoiser if pipe_or_denoiser is not denoiser else None
    name = getattr(owner, "name_or_path", None) or getattr(denoiser.config, "_name_or_path", None) or None
    return {
        "base_model_name_or_path": str(name) if name else None,
        "base_model_class": type(owner).__name__ if owner is not None else type(denoiser).__name__,
        "base_model_config_hash": digest,
    }


def image_side(pipe) -> int:
    """The pipeline's default image side in pixels: the denoiser's `sample_size` (FLUX.1: the pipeline's
    `default_sample_size`) times the VAE scale factor."""
    size = getattr(denoiser_of(pipe).config, "sample_size", None) or pipe.default_sample_size
    return size * pipe.vae_scale_factor


def freeze(pipe) -> None:
    """Freeze every weight of the pipeline's family: the denoiser, the VAE and each text encoder it has."""
    denoiser_of(pipe).requires_grad_(False)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)


# -- noising and targets ---------------------------------------------------------------------------------------------
def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str, alphas_cumprod=None):
    """`x_t` for a diffusion (`epsilon` / `v_prediction`, DDPM `alphas_cumprod`) or a flow model (`flow`, s = t/1000).

    Args:
        x0 (`torch.Tensor`): clean latents `(B, C, H, W)`.
        noise (`torch.Tensor`): Gaussian noise of the same shape.
        t (`torch.Tensor`): integer timesteps in [0, 1000) broadcastable to the batch.
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"flow"`.
        alphas_cumprod (`torch.Tensor`, *optional*): the DDPM schedule (not used by flow models).
    """
    if prediction_type == "flow":
        s = _per_row(t.to(x0.dtype) / 1000.0, x0)
        return (1 - s) * x0 + s * noise
    a = _per_row(alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype), x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str, alphas_cumprod=None):
    """What the denoiser regresses: the noise (epsilon), `sqrt(a) noise - sqrt(1-a) x0` (v), or `noise - x0` (flow)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":
        a = _per_row(alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype), x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow', got {prediction_type!r}.")


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.reshape(-1)
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


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
    flow_model = False  # a rectified-flow model: x_t = (1 - s) x0 + s noise, target noise - x0
    conditioning_layout = "stock"  # part of the encoding cache's key when encode_prompts differs from the pipeline's

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = denoiser_of(pipe)
        self.family = family_of(pipe)
        if self.flow_model:
            self.prediction_type, self.alphas_cumprod = "flow", None
        else:
            self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
            self.alphas_cumprod = _alphas_cumprod(pipe.scheduler)

    @property
    def flow(self) -> bool:
        """Whether the family is a flow model (sampled with `FlowMatchEulerDiscreteScheduler`)."""
        return self.prediction_type == "flow"

    def training_timesteps(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The timesteps a training step uses for uniformly drawn integer `t` in [0, 1000): `t` itself, except for
        families whose schedule shifts the noise levels (FLUX.1); `latents` are the clean latents of the batch."""
        return t

    def latent_shape(self, batch: int, side: int) -> tuple[int, ...]:
        """Shape of the initial noise of `batch` images of `side` pixels: `(B, C, side / f, side / f)`."""
        channels, size = self.denoiser.config.in_channels, side // self.pipe.vae_scale_factor
        return (batch, channels, size, size)

    def set_sampling_timesteps(self, scheduler, steps: int, device, latents: torch.Tensor) -> None:
        """`scheduler.set_timesteps` for `steps` sampling steps as the family's pipeline calls it."""
        scheduler.set_timesteps(steps, device=device)

    def add_noise(self, x0, noise, t):
        """`x_t` of clean latents `x0` `(B, C, H, W)` at timesteps `t` for this family (see [`add_noise`])."""
        return add_noise(x0, noise, t, self.prediction_type, self.alphas_cumprod)

    def training_target(self, x0, noise, t):
        """The regression target of the denoiser at `x_t` for this family (see [`training_target`])."""
        return training_target(x0, noise, t, self.prediction_type, self.alphas_cumprod)

    def decode(self, latents):
        """Images in [0, 1] `(B, 3, H, W)` from latents, undoing the VAE's shift and scale."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @property
    def device(self):
        """The denoiser's device."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self):
        """The denoiser's dtype."""
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
        """The conditioning tensors of `captions` through the pipeline's own `encode_prompt` (no gradient)."""
        raise NotImplementedError

    def predict(self, noisy, timesteps, conditioning: dict):
        """The denoiser's prediction at `noisy` `(B, C, H, W)`, `timesteps` `(B,)` with `conditioning` rows."""
        raise NotImplementedError


class UNetBackbone(Backbone):
    """SD1.x / SD2.x: one CLIP text encoder, `unet(x_t, t, encoder_hidden_states)`."""

    def encode_prompts(self, captions):
        """The CLIP conditioning of `captions` through `pipe.encode_prompt` (no classifier-free guidance)."""
        import torch

        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                list(captions), self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"prompt_embeds": embeds}

    def predict(self, noisy, timesteps, conditioning):
        """`unet(x_t, t, encoder_hidden_states)`."""
        return self.denoiser(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample


class SDXLBackbone(Backbone):
    """SDXL: two CLIP encoders; the UNet also takes the pooled embedding and the size/crop `time_ids`."""

    def encode_prompts(self, captions):
        """Both CLIP encoders' conditioning of `captions`, with the pooled embedding."""
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, noisy, timesteps, conditioning):
        """The UNet call with the pooled embedding and the size / crop `time_ids` of a centre-cropped square."""
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

    flow_model = True

    def __init__(self, pipe):
        super().__init__(pipe)
        self.collapsed_padding = is_null_t5(getattr(pipe, "text_encoder_3", None)) and install_collapsed_padding(
            self.denoiser
        )
        if self.collapsed_padding:
            self.conditioning_layout = f"sd3-zero-rows-collapsed-{STOCK_T5_ROWS}"

    def encode_prompts(self, captions):
        """The CLIP (and T5, or one collapsed zero row) conditioning of `captions`, with the pooled projection."""
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
        """The transformer call with t in [0, 1000] and the pooled projection."""
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


class FluxBackbone(Backbone):
    """FLUX.1: CLIP (pooled) and T5 text encoders; a flow model on packed latents `(B, h/2 * w/2, 4C)`.

    - Latents are packed as `FluxPipeline` packs them (2 x 2 patches), so the encoding cache holds packed latents and
      everything between the cache and the VAE works on `(B, L, 4C)` rows;
    - training noise levels follow the pipeline's schedule: a uniform `t / 1000` is shifted by the scheduler itself
      (`set_timesteps(sigmas=..., mu=...)`, with `mu` from the packed length as `FluxPipeline` computes it when the
      scheduler uses dynamic shifting);
    - the denoiser is called as the pipeline calls it: `timestep = t / 1000`, zero text ids, the latent grid's image
      ids, and the distilled guidance embedding at the pipeline's default `guidance_scale` when the model has one
      ([dev]; [schnell] has none). There is no second, unconditional branch: FLUX.1 has no true classifier-free
      guidance in its stock call.
    """

    flow_model = True

    def __init__(self, pipe):
        super().__init__(pipe)
        from diffusers import FlowMatchEulerDiscreteScheduler

        defaults = inspect.signature(type(pipe).__call__).parameters
        self.guidance_scale = defaults["guidance_scale"].default if self.denoiser.config.guidance_embeds else None
        self.max_sequence_length = defaults["max_sequence_length"].default
        self._shifter = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # never the pipeline's

    def encode_prompts(self, captions):
        """The T5 context and CLIP pooled embedding of `captions` through `pipe.encode_prompt`."""
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=list(captions),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_image_moments(self, pixels):
        """VAE posterior mean and std, shifted and scaled, then packed: `(B, h/2 * w/2, 4C)` each."""
        mean, std = super().encode_image_moments(pixels)
        return pack_latents(mean), pack_latents(std)

    def decode(self, latents):
        """Images in [0, 1] from packed latents of a square grid."""
        return super().decode(unpack_latents(latents))

    def _mu(self, packed_length: int) -> float | None:
        if not self._shifter.config.use_dynamic_shifting:
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self._shifter.config
        return calculate_shift(
            packed_length,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def training_timesteps(self, t, latents):
        """`1000 * sigma` with `sigma` the scheduler's shift of `t / 1000` at this image size (float timesteps)."""
        import numpy as np

        levels = (t.detach().double().cpu().numpy().reshape(-1) / 1000.0).astype(np.float32)
        with np.errstate(divide="ignore"):  # t = 0 is a clean latent: the shift maps it to 0 through 1 / 0
            self._shifter.set_timesteps(sigmas=levels, mu=self._mu(latents.shape[1]), device="cpu")
        shifted = self._shifter.sigmas[:-1].to(torch.float32) * 1000.0  # the scheduler appends a terminal 0
        return shifted.reshape(t.shape).to(t.device)

    def latent_shape(self, batch, side):
        """Packed initial noise: `(B, (side / 2f)^2, in_channels)`."""
        size = side // (self.pipe.vae_scale_factor * 2)
        return (batch, size * size, self.denoiser.config.in_channels)

    def set_sampling_timesteps(self, scheduler, steps, device, latents):
        """FluxPipeline's schedule: `sigmas = linspace(1, 1 / steps, steps)`, shifted with `mu` of the packed length."""
        import numpy as np

        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        scheduler.set_timesteps(
            steps if sigmas is None else None, device=device, sigmas=sigmas, mu=self._mu(latents.shape[1])
        )

    def predict(self, noisy, timesteps, conditioning):
        """The transformer call of `FluxPipeline`: `t / 1000`, text and image ids, pooled CLIP, guidance embedding."""
        batch, length = noisy.shape[:2]
        side = math.isqrt(length)
        context = conditioning["prompt_embeds"]
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((batch,), float(self.guidance_scale), device=noisy.device, dtype=torch.float32)
        timesteps = timesteps.to(noisy.dtype).reshape(-1).expand(batch)
        return self.denoiser(
            hidden_states=noisy,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=noisy.device, dtype=context.dtype),
            img_ids=latent_image_ids(side, side, noisy.device, noisy.dtype),
        ).sample


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` latents as FLUX.1's rows of 2 x 2 patches: `(B, H/2 * W/2, 4C)` (as `FluxPipeline` packs)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.1 packs 2 x 2 latent patches; the latent grid {h} x {w} is not even.")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of [`pack_latents`] for a square grid: `(B, L, 4C)` -> `(B, C, 2 sqrt(L), 2 sqrt(L))`."""
    b, length, channels = packed.shape
    side = math.isqrt(length)
    if side * side != length or channels % 4:
        raise ValueError(f"Expected packed latents of a square grid, (B, side^2, 4C); got shape {tuple(packed.shape)}.")
    patches = packed.reshape(b, side, side, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, side * 2, side * 2)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX.1's image position ids of a packed `height x width` grid: `(height * width, 3)` rows `(0, row, column)`."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def collapsed_row(pipe, text_rows: int) -> CollapsedPadding:
    """Where the collapsed zero row sits in each block's context: the last text row, which is row `text_rows - 1`
    unless soft tokens are prepended to the text (then it is the context's last row)."""
    injection = getattr(denoiser_of(pipe), INJECTION_ATTRIBUTE, None)
    prepended = injection is not None and injection.soft_tokens.config.position == "prepend"
    return CollapsedPadding(STOCK_T5_ROWS, -1 if prepended else text_rows - 1)


@contextmanager
def collapsed_generation(pipe):
    """Yields extra `pipe(...)` arguments that draw the same images faster on an SD3 pipeline without T5 or with a
    null T5 (`{}` for any other pipeline): one zero row instead of 256, with its attention weight corrected."""
    if (
        backbone_class(pipe) is not SD3Backbone
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


def backbone_class(pipe) -> type[Backbone]:
    """The [`Backbone`] class of the pipeline's family (from [`FAMILY_TABLE`])."""
    return globals()[get_family(family_of(pipe)).backbone]


def backbone_for(pipe) -> Backbone:
    """The [`Backbone`] of a `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or
    `FluxPipeline`."""
    backbone = backbone_class(pipe)
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "vae", None) is None:
        raise ValueError(f"Expected a diffusers text-to-image pipeline with a VAE, got {type(pipe).__name__}.")
    return backbone(pipe)


def _alphas_cumprod(scheduler):
    values = getattr(scheduler, "alphas_cumprod", None)
    if values is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; SoftAlign needs a DDPM-family schedule.")
    return torch.as_tensor(values, dtype=torch.float32)
