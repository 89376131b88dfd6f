"""Soft tokens (and/or a LoRA) in an existing trl 0.23.1 `DDPOTrainer` / `AlignPropTrainer` set-up.

trl 0.23.1 is the last release with diffusion trainers. Its trainers run the UNet themselves, in sampling (under
`no_grad`), in the DDPO loss and in AlignProp's differentiable sampler, so the only place where soft tokens stay the
same in all three is inside the UNet call: [`SoftTokenDDPOStableDiffusionPipeline`] attaches them with softalign's
forward pre-hooks (appending them to `prompt_embeds` outside the UNet would give stale tokens in DDPO and no gradient
in AlignProp, which encodes prompts under `no_grad`).

Known defects of trl 0.23.1 this module works around (the numbers of `ENVIRONMENT.md`):

1. constructing a trl pipeline or trainer without an accelerate state raises `RuntimeError`: the pipeline and the
   trainers here create `accelerate.PartialState()` first;
2. `DDPOTrainer.save_pretrained` raises `AttributeError` (`_save_pretrained` calls `create_model_card`, which reads
   `transformers.Trainer` attributes) and there is no `save_model`: the trainers override `_save_pretrained`, add
   `save_model`, and the pipeline's `save_pretrained` writes adapters only;
3. resuming a LoRA run loads the checkpoint into a second adapter `default_1` (diffusers' `load_lora_into_unet` picks
   a fresh adapter name) that the optimizer does not hold: `load_checkpoint` here copies the saved tensors into the
   parameters the optimizer holds;
5. `image_samples_hook` without a tracker raises `IndexError` (`self.accelerator.trackers[0]`): the trainers give the
   hook `None` as the tracker then;
7. `get_trainable_layers()` must return one `nn.Module`: it returns a [`TrainableLayers`] holding exactly the
   trained parameters.

Not fixed here: 4 (with several processes the gradients are never all-reduced, because trl runs forward/backward on
the unwrapped UNet) and 6 (SD1.x/2.x only, DDIM forced): the pipeline refuses other pipeline classes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_directory
from ..injection import attach_soft_tokens, check_compatible, injection_of
from ..loaders import read_soft_tokens, save_soft_tokens
from ..soft_tokens import SoftTokens
from .trl_trainers import (  # checks that trl 0.23.1 is installed
    DefaultDDPOStableDiffusionPipeline,
    SoftAlignAlignPropTrainer,
    SoftAlignDDPOTrainer,
    ensure_accelerate_state,
)

SOFT_TOKENS_DIR = "soft_tokens"  # softalign adapter format (`load_soft_tokens(pipe, dir / SOFT_TOKENS_DIR)`)
LORA_DIR = "unet_lora"  # PEFT format: adapter_config.json + adapter_model.safetensors
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # the name trl and diffusers give a single trained adapter


def _default_lora_config():
    from peft import LoraConfig

    # trl's `DefaultDDPOStableDiffusionPipeline.get_trainable_layers` uses this adapter.
    return LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )


class TrainableLayers(nn.Module):
    """The one module trl trains (defect 7): the trained soft tokens and the LoRA parameters of the UNet.

    It shares its parameters with the pipeline (no copies), so trl's optimizer, gradient clipping and `prepare` act on
    the live tokens and adapter. It has no forward: trl always calls the UNet itself.

    Args:
        soft_tokens ([`SoftTokens`], *optional*): the trained tokens (`None` when they are frozen).
        lora_parameters (`dict[str, nn.Parameter]`): the trained LoRA parameters, keyed by their UNet names.
    """

    def __init__(self, soft_tokens: SoftTokens | None, lora_parameters: dict[str, nn.Parameter]):
        super().__init__()
        self.soft_tokens = soft_tokens
        self.lora = nn.ParameterList(list(lora_parameters.values()))
        self.lora_names = list(lora_parameters)

    def forward(self, *args, **kwargs):
        raise RuntimeError("TrainableLayers only holds the trained parameters; run the pipeline's UNet instead.")


class SoftTokenDDPOStableDiffusionPipeline(DefaultDDPOStableDiffusionPipeline):
    """trl's DDPO/AlignProp pipeline built from an existing `StableDiffusionPipeline`, carrying soft tokens.

    Unlike trl's constructor (which takes a hub id and calls `from_pretrained`), this one takes a loaded pipeline and
    never downloads. It prepares the pipeline as trl does, in place: a DDIM scheduler (trl's sampler needs it), no
    safety checker, the VAE, text encoder and UNet frozen. The trained parameters are the soft tokens (unless
    `train_soft_tokens=False`) and, with `use_lora=True`, a LoRA adapter named `"default"` on the UNet.

    Args:
        sd_pipeline (`diffusers.StableDiffusionPipeline`): an SD1.x/2.x pipeline (trl 0.23.1 supports no other).
        soft_tokens ([`SoftTokens`], *optional*): tokens to attach. Defaults to the tokens the pipeline already
            carries (`load_soft_tokens(pipe, ...)`), if any.
        train_soft_tokens (`bool`, *optional*, defaults to `True`): train the tokens, or keep them as frozen
            conditioning (then `use_lora` must be on).
        use_lora (`bool`, *optional*, defaults to `False`): train a LoRA adapter on the UNet. Implied by `lora_config`.
        lora_config (`peft.LoraConfig`, *optional*): the adapter; defaults to trl's (rank 4 on to_q/k/v/out).

    Example:
        ```py
        >>> from trl import DDPOConfig
        >>> from softalign.rl.trl import SoftAlignDDPOTrainer, SoftTokenDDPOStableDiffusionPipeline
        >>> pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")
        >>> ddpo_pipe = SoftTokenDDPOStableDiffusionPipeline.from_pipeline(pipe, soft_tokens=tokens)
        >>> trainer = SoftAlignDDPOTrainer(DDPOConfig(...), reward_fn, prompt_fn, ddpo_pipe)
        >>> trainer.train()
        >>> trainer.save_pretrained("out")  # out/soft_tokens (softalign adapter), out/unet_lora (PEFT, with LoRA)
        ```
    """

    def __init__(
        self,
        sd_pipeline,
        *,
        soft_tokens: SoftTokens | None = None,
        train_soft_tokens: bool = True,
        use_lora: bool = False,
        lora_config=None,
    ):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        ensure_accelerate_state()
        if isinstance(sd_pipeline, (str, os.PathLike)):
            raise TypeError(
                f"SoftTokenDDPOStableDiffusionPipeline takes a loaded StableDiffusionPipeline, got the path or id "
                f"{str(sd_pipeline)!r}; load it first with `StableDiffusionPipeline.from_pretrained(local_path)`."
            )
        if not isinstance(sd_pipeline, StableDiffusionPipeline):
            raise TypeError(
                f"trl 0.23.1's DDPO/AlignProp sampler supports SD1.x/2.x StableDiffusionPipeline only (SDXL needs "
                f"added_cond_kwargs, SD3 a flow-model sampler), got {type(sd_pipeline).__name__}."
            )
        use_lora = bool(use_lora or lora_config is not None)
        existing = injection_of(sd_pipeline)
        # Validate everything before touching the user's pipeline.
        if soft_tokens is not None and existing is not None and existing.soft_tokens is not soft_tokens:
            raise ValueError(
                "The pipeline already carries other soft tokens; unload them (`unload_soft_tokens(pipe)`) or pass "
                "soft_tokens=None to use them."
            )
        if soft_tokens is not None and existing is None:
            check_compatible(soft_tokens.config, sd_pipeline)
        if soft_tokens is None and existing is None and not use_lora:
            raise ValueError("Nothing to train: pass soft_tokens (or a pipeline carrying them) and/or use_lora=True.")
        if use_lora and getattr(sd_pipeline.unet, "peft_config", None):
            raise ValueError(
                f"The UNet already carries PEFT adapters {sorted(sd_pipeline.unet.peft_config)}; fuse or unload them "
                "first (`pipe.fuse_lora(); pipe.unload_lora_weights()`) so that exactly one adapter is trained."
            )

        # Deliberately no super().__init__(): trl's constructor downloads from the hub.
        self.sd_pipeline = sd_pipeline
        self.pretrained_model = getattr(sd_pipeline, "name_or_path", None)
        self.pretrained_revision = None
        self.use_lora = use_lora
        self.train_soft_tokens = bool(train_soft_tokens)
        sd_pipeline.scheduler = DDIMScheduler.from_config(sd_pipeline.scheduler.config)
        sd_pipeline.safety_checker = None
        for module in (sd_pipeline.vae, sd_pipeline.text_encoder, sd_pipeline.unet):
            module.requires_grad_(False)
        self.injection = existing  # when both are given they are the same tokens (checked above)
        if existing is None and soft_tokens is not None:
            self.injection = attach_soft_tokens(sd_pipeline, soft_tokens)
        if self.injection is not None:
            self.injection.soft_tokens.requires_grad_(self.train_soft_tokens)
        if use_lora:
            sd_pipeline.unet.add_adapter(lora_config or _default_lora_config(), adapter_name=ADAPTER_NAME)

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        soft_tokens: SoftTokens | None = None,
        use_lora: bool = False,
        lora_config=None,
        train_soft_tokens: bool = True,
    ) -> SoftTokenDDPOStableDiffusionPipeline:
        """Wrap a loaded `StableDiffusionPipeline` (see the class docstring for the arguments)."""
        return cls(
            pipe,
            soft_tokens=soft_tokens,
            use_lora=use_lora,
            lora_config=lora_config,
            train_soft_tokens=train_soft_tokens,
        )

    @property
    def soft_tokens(self) -> SoftTokens | None:
        return None if self.injection is None else self.injection.soft_tokens

    @property
    def autocast(self):
        # The frozen UNet runs in the trainer's inference dtype; the trained tensors stay float32 and are cast per call
        # (the hooks cast the tokens to the context dtype, PEFT casts LoRA inputs), so no autocast is needed. trl
        # makes the same choice for LoRA.
        return contextlib.nullcontext

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA parameters of the trained adapter, keyed by their UNet names (empty without LoRA)."""
        if not self.use_lora:
            return {}
        marker = f".{ADAPTER_NAME}."
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and marker in n}

    def get_trainable_layers(self) -> TrainableLayers:
        """One module holding the trained parameters (trl calls this after moving the UNet to its device/dtype)."""
        device = self.unet.device
        trained_tokens = self.soft_tokens if self.train_soft_tokens else None
        if self.soft_tokens is not None:
            # The tokens live on the injection, not in the UNet, so the trainer's `unet.to(device)` did not move them.
            self.soft_tokens.to(device=device, dtype=torch.float32)
        lora = self.lora_parameters()
        for param in lora.values():
            param.requires_grad_(True)
            param.data = param.data.to(torch.float32)  # as trl: fp32 masters for fp16/bf16 runs
        if trained_tokens is None and not lora:
            raise ValueError(
                "Nothing to train: the soft tokens are frozen (train_soft_tokens=False) and use_lora is off. "
                "Pass train_soft_tokens=True and/or use_lora=True."
            )
        return TrainableLayers(trained_tokens, lora)

    # -- saving: checkpoints (accelerate hooks) and final adapters ---------------------------------------------
    def save_pretrained(self, output_dir) -> None:
        """Write the adapters (the base model is unchanged): `soft_tokens/` and, with LoRA, `unet_lora/`.

        Load them into a stock pipeline with `load_soft_tokens(pipe, output_dir / "soft_tokens")` and
        `pipe.unet.load_lora_adapter(output_dir / "unet_lora", prefix=None, weight_name="adapter_model.safetensors")`.
        """
        output_dir = Path(output_dir)
        if self.soft_tokens is not None:
            save_soft_tokens(self.soft_tokens, output_dir / SOFT_TOKENS_DIR)
        if self.use_lora:
            _save_lora(self.unet, output_dir / LORA_DIR)

    def save_checkpoint(self, models, weights, output_dir) -> None:
        """accelerate's save-state pre-hook (via trl's `_save_model_hook`): the same files as `save_pretrained`."""
        _check_one_model(models)
        self.save_pretrained(output_dir)

    def load_checkpoint(self, models, input_dir) -> None:
        """accelerate's load-state pre-hook: copy the saved tensors into the live parameters.

        Copying in place keeps the parameters the optimizer holds (trl's own hook loads LoRA into a new adapter,
        defect 3, and never restores soft tokens).
        """
        _check_one_model(models)
        input_dir = Path(input_dir)
        if self.soft_tokens is not None:
            saved = read_soft_tokens(_required(input_dir / SOFT_TOKENS_DIR, "soft tokens"))
            expected = self.soft_tokens.config.parameter_shapes()
            if saved.config.parameter_shapes() != expected:
                raise ValueError(
                    f"Checkpoint {input_dir} holds soft tokens of shapes {saved.config.parameter_shapes()}, this "
                    f"pipeline's tokens have {expected}."
                )
            with torch.no_grad():
                for name, param in self.soft_tokens.state_dict(keep_vars=True).items():
                    param.copy_(saved.state_dict()[name])
        if self.use_lora:
            _load_lora(self.unet, _required(input_dir / LORA_DIR, "a LoRA adapter"))


def _check_one_model(models) -> None:
    if len(models) != 1:
        raise ValueError(f"Expected the one TrainableLayers module trl prepared, got {len(models)} models.")


def _required(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path.parent} has no {path.name}/, but this run trains {what}.")
    return path


def _save_lora(unet, path: Path) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config[ADAPTER_NAME].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config_json = json.dumps(config, indent=2, sort_keys=True, default=str)
    with atomic_directory(path) as staging:
        (staging / LORA_CONFIG).write_text(config_json + "\n", encoding="utf-8")
        # diffusers' `load_lora_adapter` reads the adapter config from this header key (rank and alpha exactly).
        save_file(tensors, str(staging / LORA_WEIGHTS), metadata={"format": "pt", "lora_adapter_metadata": config_json})


def _load_lora(unet, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / LORA_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA checkpoint {path} is missing {LORA_WEIGHTS}.")
    state = load_file(str(weights))
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as error:  # shape mismatch: a different rank or target set
        raise ValueError(f"LoRA checkpoint {weights} does not fit this UNet's adapter: {error}") from error
    marker = f".{ADAPTER_NAME}."
    missing = [k for k in result.missing_keys if "lora_" in k and marker in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"LoRA checkpoint {weights} does not match this UNet's adapter (unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]})."
        )


__all__ = [
    "SoftAlignAlignPropTrainer",
    "SoftAlignDDPOTrainer",
    "SoftTokenDDPOStableDiffusionPipeline",
    "TrainableLayers",
]
