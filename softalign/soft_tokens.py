"""Soft tokens: a small bank of learnable vectors that lives in a frozen denoiser's text context.

SoftREPA (arXiv 2503.08250) trains one bank; AGSM (arXiv 2605.30038) trains two, psi+ (bank 0) on matched pairs and
psi- (bank 1) on mismatched pairs. Both add an optional timestep embedding (100 buckets of 10 training steps) to every
token. This module only holds the parameters and turns (bank ids, timesteps) into context tokens; `injection.py`
puts them into a denoiser.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from .families import FAMILIES, backbone_for, context_dim_of, family_of, soft_token_preset
from .version import __version__

# The adapter format (PEFT-like): a directory with `adapter_config.json` (the config) and `adapter_model.safetensors`
# (float32 tensors keyed like `SoftTokens.state_dict()`; the config repeated in its header). Nothing here unpickles.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "softalign.soft_tokens"
BASE_MODEL_KEYS = ("base_model_name_or_path", "base_model_class", "base_model_config_hash")
NUM_TIMESTEP_BUCKETS = 100
NUM_TRAIN_TIMESTEPS = 1000


class Architecture(str, Enum):
    """The injection layout of a denoiser family."""

    UNET = "unet"  # SD1.x / SD2.x / SDXL: one token set shared by the hooked UNet blocks
    MMDIT = "mmdit"  # SD3 / SD3.5: one token set per transformer block
    MMDIT_ROPE = "mmdit_rope"  # FLUX.1: one token set per chosen block, in text slots reserved once (rotary ids)


class Position(str, Enum):
    """Where the tokens sit in the text context."""

    AFTER_BOS = "after_bos"  # UNet: [h_0 (BOS), s_1..s_n, h_1..h_L]
    APPEND = "append"  # MMDiT, AGSM: [h_1..h_L, s_1..s_n]
    PREPEND = "prepend"  # MMDiT, SoftREPA: [s_1..s_n, h_1..h_L]


class Init(str, Enum):
    """How new tokens are initialised."""

    NORMAL = "normal"  # normal(0, init_std), as both official codes
    NULL_PROMPT = "null_prompt"  # every token starts at the BOS state of the empty prompt (official SD1.5 code)


UNET_BLOCK_GROUPS = ("down", "mid", "up")
ROPE_BLOCKS = ("dual", "single", "all")  # mmdit_rope: which blocks count as layers 0, 1, ... (see `blocks`)


@dataclass
class SoftTokensConfig:
    """What a set of soft tokens is, saved next to the weights as `adapter_config.json`.

    Use [`SoftTokensConfig.for_family`] for the papers' settings of a model family.

    Args:
        architecture (`str`): `"unet"` (SD1.x/2.x, SDXL), `"mmdit"` (SD3, SD3.5) or `"mmdit_rope"` (FLUX.1).
        dim (`int`): context width: `unet.config.cross_attention_dim`, `transformer.config.caption_projection_dim`
            (SD3) or the transformer's inner width `num_attention_heads * attention_head_dim` (FLUX.1).
        n_tokens (`int`, *optional*, defaults to 4): tokens per bank (and per layer for MMDiT).
        n_banks (`int`, *optional*, defaults to 2): 2 for AGSM (psi+ = bank 0, psi- = bank 1), 1 for SoftREPA.
        n_layers (`int`, *optional*): MMDiT only: the first `n_layers` transformer blocks get their own tokens.
        blocks (`str`, *optional*): `"mmdit_rope"` only: which blocks are layers 0, 1, ...: `"dual"` (the
            double-stream blocks, the default), `"single"` (the single-stream blocks) or `"all"` (double-stream, then
            single-stream).
        unet_blocks (`list[str]`, *optional*): UNet only: which block groups see the tokens, of down / mid / up.
        position (`str`): `"after_bos"` for UNets; `"append"` (AGSM) or `"prepend"` (SoftREPA) for both MMDiT layouts.
        timestep_embedding (`bool`, *optional*, defaults to `True`): add a 100-bucket embedding of `t // 10`.
        init (`str`, *optional*, defaults to `"normal"`): `"normal"` or `"null_prompt"` (UNet only; see
            [`SoftTokens.init_from_null_prompt`]).
        init_std (`float`, *optional*, defaults to 0.02): standard deviation of the normal initialisation.
        family (`str`, *optional*): informational: `"sd15"`, `"sd2"`, `"sdxl"`, `"sd3"`, `"sd35"` or `"flux"`.
        softalign_version (`str`): the version that wrote the config.
    """

    architecture: str = field(metadata={"help": "unet (SD1.x/2.x, SDXL), mmdit (SD3, SD3.5) or mmdit_rope (FLUX.1)."})
    dim: int = field(metadata={"help": "Context width the tokens live in."})
    n_tokens: int = field(default=4, metadata={"help": "Tokens per bank (per layer for mmdit)."})
    n_banks: int = field(default=2, metadata={"help": "2 for AGSM (psi+, psi-), 1 for SoftREPA."})
    n_layers: int | None = field(default=None, metadata={"help": "mmdit: number of leading blocks with tokens."})
    unet_blocks: list[str] | None = field(default=None, metadata={"help": "unet: block groups of down/mid/up."})
    blocks: str | None = field(default=None, metadata={"help": "mmdit_rope: dual, single or all (dual then single)."})
    position: str | None = field(default=None, metadata={"help": "after_bos (unet), append or prepend (mmdit)."})
    timestep_embedding: bool = field(default=True, metadata={"help": "Add the 100-bucket timestep embedding."})
    init: str = field(default="normal", metadata={"help": "normal or null_prompt."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the normal initialisation."})
    family: str | None = field(default=None, metadata={"help": "The model family (informational)."})
    softalign_version: str = field(default=__version__, metadata={"help": "Version that wrote this config."})

    def __post_init__(self):
        self.architecture = _choice("architecture", self.architecture, Architecture)
        self.init = _choice("init", self.init, Init)
        for name in ("dim", "n_tokens", "n_banks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SoftTokensConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.timestep_embedding, bool):
            raise ValueError(
                f"SoftTokensConfig.timestep_embedding must be true or false, got {self.timestep_embedding!r}."
            )
        if not isinstance(self.init_std, (int, float)) or not 0 < self.init_std < float("inf"):
            raise ValueError(f"SoftTokensConfig.init_std must be a positive number, got {self.init_std!r}.")
        if self.architecture == Architecture.UNET.value:
            self._validate_unet()
        else:
            self._validate_mmdit()
        if self.architecture == Architecture.MMDIT_ROPE.value:
            if self.blocks is None:
                self.blocks = ROPE_BLOCKS[0]
            if self.blocks not in ROPE_BLOCKS:
                raise ValueError(f"SoftTokensConfig.blocks must be one of {list(ROPE_BLOCKS)}, got {self.blocks!r}.")
        elif self.blocks is not None:
            raise ValueError(f"SoftTokensConfig.blocks is for architecture 'mmdit_rope' only, got {self.blocks!r}.")

    def _validate_unet(self):
        if self.position is None:
            self.position = Position.AFTER_BOS.value
        if self.position != Position.AFTER_BOS.value:
            raise ValueError(
                f"SoftTokensConfig.position must be 'after_bos' for architecture 'unet', got {self.position!r}."
            )
        if self.n_layers is not None:
            raise ValueError(f"SoftTokensConfig.n_layers is for architecture 'mmdit' only, got {self.n_layers!r}.")
        if self.unet_blocks is None:
            self.unet_blocks = ["down", "mid"]
        blocks = list(self.unet_blocks)
        unknown = [b for b in blocks if b not in UNET_BLOCK_GROUPS]
        if unknown or not blocks or len(set(blocks)) != len(blocks):
            raise ValueError(
                f"SoftTokensConfig.unet_blocks must be a non-empty list of distinct names from {UNET_BLOCK_GROUPS}, "
                f"got {self.unet_blocks!r}."
            )
        self.unet_blocks = [b for b in UNET_BLOCK_GROUPS if b in blocks]  # canonical order

    def _validate_mmdit(self):
        if self.position is None:
            self.position = Position.APPEND.value
        if self.position not in (Position.APPEND.value, Position.PREPEND.value):
            raise ValueError(
                f"SoftTokensConfig.position must be 'append' or 'prepend' for architecture {self.architecture!r}, "
                f"got {self.position!r}."
            )
        if self.n_layers is None:
            self.n_layers = 5
        if isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"SoftTokensConfig.n_layers must be a positive integer, got {self.n_layers!r}.")
        if self.unet_blocks is not None:
            raise ValueError(f"SoftTokensConfig.unet_blocks is for architecture 'unet' only, got {self.unet_blocks!r}.")
        if self.init == Init.NULL_PROMPT.value:
            raise ValueError("SoftTokensConfig.init 'null_prompt' is for architecture 'unet' only.")

    @classmethod
    def for_family(cls, family: str, dim: int | None = None, objective: str = "agsm", **overrides) -> SoftTokensConfig:
        """The official configuration of `objective` (`"agsm"` or `"softrepa"`) for a model family.

        AGSM (`scripts/train_coco.sh`): 4 tokens, timestep part on, UNet blocks down + mid, SD3 5 layers appended;
        SD1.5 starts from the null-prompt BOS state. SoftREPA (`run_train.sh`): one bank, SD1.5 down only, SDXL
        down + mid, SD3 5 layers prepended; SD1.5 starts from the null-prompt BOS state.
        """
        family = _choice("family", family, FAMILIES)
        settings = soft_token_preset(family, objective)  # the family's entry in softalign.families
        if dim is not None:
            settings["dim"] = dim
        settings.update(overrides)
        return cls(**settings)

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """The config as sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> SoftTokensConfig:
        """Build from a dict; keys written by a newer version are dropped with a warning, missing ones fail."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of SoftTokensConfig fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown SoftTokensConfig keys {unknown} (written by a newer version?).",
                stacklevel=2,
            )
        missing = [name for name in ("architecture", "dim") if name not in data]
        if missing:
            raise ValueError(f"{source}: SoftTokensConfig is missing the required keys {missing}.")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: invalid SoftTokensConfig: {error}") from error

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor of a [`SoftTokens`] module with this config, keyed like its `state_dict()`."""
        if self.architecture == Architecture.UNET.value:
            shapes = {"tokens": (self.n_banks, self.n_tokens, self.dim)}
            embedding_width = self.dim
        else:
            shapes = {"tokens": (self.n_banks, self.n_layers, self.n_tokens, self.dim)}
            embedding_width = self.n_layers * self.dim
        if self.timestep_embedding:
            shapes["timestep_embedding.weight"] = (NUM_TIMESTEP_BUCKETS, embedding_width)
        return shapes


def _choice(name: str, value, allowed) -> str:
    values = [m.value for m in allowed] if isinstance(allowed, type) else list(allowed)
    value = value.value if isinstance(value, Enum) else value
    if value not in values:
        raise ValueError(f"SoftTokensConfig.{name} must be one of {values}, got {value!r}.")
    return value


def timestep_buckets(timesteps: torch.Tensor) -> torch.Tensor:
    """Bucket index `t // 10` of each timestep, with t truncated to an integer and t >= 1000 mapped to 999.

    The official code casts t to int32 and, when any t of the batch is 1000, subtracts one from the whole batch; every
    row of a batch shares t in both codes' sampling and training, so clamping per row gives the same buckets.
    Flow-model timesteps are floats (1000 * sigma) and are truncated the same way.
    """
    steps = timesteps.detach().to(torch.float64).floor().long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return steps // (NUM_TRAIN_TIMESTEPS // NUM_TIMESTEP_BUCKETS)


class SoftTokens(nn.Module):
    """The learnable soft tokens (a bank axis first) and their optional timestep embedding.

    Parameters (keys of `state_dict()`):
        - `tokens`: `(n_banks, n_tokens, dim)` for UNets, `(n_banks, n_layers, n_tokens, dim)` for MMDiT;
        - `timestep_embedding.weight`: `(100, dim)` for UNets, `(100, n_layers * dim)` for MMDiT (chunked per layer).

    Example:
        ```py
        >>> from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
        >>> tokens = SoftTokens(SoftTokensConfig.for_family("sd15"))
        >>> injection = attach_soft_tokens(pipe.unet, tokens)  # pipe(prompt) now generates with psi+
        ```
    """

    def __init__(self, config: SoftTokensConfig):
        super().__init__()
        self.config = config
        shapes = config.parameter_shapes()
        self.tokens = nn.Parameter(torch.empty(shapes["tokens"]))
        nn.init.normal_(self.tokens, mean=0.0, std=config.init_std)
        self.base_model: dict | None = None  # what the tokens were trained on, when read from an adapter
        self.timestep_embedding = None
        if config.timestep_embedding:
            self.timestep_embedding = nn.Embedding(*shapes["timestep_embedding.weight"])
            nn.init.normal_(self.timestep_embedding.weight, mean=0.0, std=config.init_std)

    @classmethod
    def for_pipeline(cls, pipe, objective: str = "agsm", **overrides) -> SoftTokens:
        """New tokens with the official configuration of `objective` for the pipeline's family, initialised as that
        configuration says: from the pipeline's empty-prompt BOS state when `init="null_prompt"` (the official SD1.x
        codes), else from a normal distribution (seed it with `torch.manual_seed` for reproducible tokens).

        Example:
            ```py
            >>> from softalign import SoftTokens
            >>> tokens = SoftTokens.for_pipeline(pipe, objective="agsm")  # psi+ and psi-
            ```
        """
        config = SoftTokensConfig.for_family(
            family_of(pipe), dim=context_dim_of(pipe), objective=objective, **overrides
        )
        tokens = cls(config)
        if config.init == Init.NULL_PROMPT.value:
            tokens.init_from_null_prompt(backbone_for(pipe).encode_prompts([""])["prompt_embeds"][:1].cpu())
        return tokens

    @property
    def n_banks(self) -> int:
        """Number of banks (2 for AGSM: psi+, psi-; 1 for SoftREPA)."""
        return self.config.n_banks

    def save_pretrained(self, path: str | os.PathLike, base_model: dict | None = None) -> Path:
        """Write the tokens to the adapter directory `path` atomically: `adapter_config.json` (the config, plus the
        base model they were trained on) and `adapter_model.safetensors` (float32, the config in its header).

        Args:
            path (`str` or `os.PathLike`): the adapter directory to create or replace.
            base_model (`dict`, *optional*): `base_model_name_or_path`, `base_model_class` and
                `base_model_config_hash` (`softalign.families.base_model_record(pipe)`); defaults to `self.base_model`.
        """
        from safetensors.torch import save_file

        from .atomic import atomic_directory

        base_model = base_model if base_model is not None else self.base_model
        config = {"format": FORMAT, **self.config.to_dict(), **(base_model or {})}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        path = Path(path)
        with atomic_directory(path) as staging:
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            save_file(
                tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "adapter_config": json.dumps(config)}
            )
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SoftTokens:
        """Read a soft-token adapter directory (written by [`save_pretrained`], `save_soft_tokens` or `softalign
        convert`) into a new module on the CPU, validating every tensor; `.base_model` holds what it was trained on.
        Attach it with `attach_soft_tokens`, or load it into a pipeline in one call with `load_soft_tokens(pipe, path)`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Soft-token adapter directory not found: {path}")
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for required in (config_file, weights_file):
            if not required.is_file():
                raise FileNotFoundError(
                    f"Soft-token adapter {path} is missing {required.name} (expected {CONFIG_NAME} and {WEIGHTS_NAME})."
                )
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{config_file} is not a softalign soft-token config (format {found!r}, expected {FORMAT!r})."
            )
        base_model = {k: data.pop(k) for k in BASE_MODEL_KEYS if k in data}
        config = SoftTokensConfig.from_dict(data, source=str(config_file))
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{weights_file} is not a readable safetensors file: {error}") from error
        expected = config.parameter_shapes()
        if set(tensors) != set(expected):
            raise ValueError(
                f"{weights_file} holds tensors {sorted(tensors)}, but its config expects {sorted(expected)}."
            )
        for name, shape in expected.items():
            if tensors[name].dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise ValueError(
                    f"{weights_file}: tensor {name!r} is {tensors[name].dtype}; expected a float16/bfloat16/float32/"
                    "float64 tensor."
                )
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, its config expects {shape}."
                )
            if not torch.isfinite(tensors[name]).all():
                raise ValueError(f"{weights_file}: tensor {name!r} contains NaN or Inf values.")
        soft_tokens = cls(config)
        soft_tokens.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        soft_tokens.base_model = base_model or None
        return soft_tokens

    @torch.no_grad()
    def init_from_null_prompt(self, null_prompt_embeds: torch.Tensor) -> None:
        """Start every token of every bank at the BOS state of the empty prompt (official SD1.5 initialisation).

        Args:
            null_prompt_embeds (`torch.Tensor` of shape `(1, seq_len, dim)` or `(seq_len, dim)`): the text encoder's
                output for `""`, as returned by the pipeline's `encode_prompt`.
        """
        if self.config.architecture != Architecture.UNET.value:
            raise ValueError("init_from_null_prompt is for UNet soft tokens only.")
        bos = null_prompt_embeds.reshape(-1, null_prompt_embeds.shape[-1])[0]
        if bos.shape[-1] != self.config.dim:
            raise ValueError(
                f"null_prompt_embeds has width {bos.shape[-1]}, expected the soft-token width {self.config.dim}."
            )
        self.tokens.copy_(bos.to(self.tokens.dtype).expand_as(self.tokens))

    def forward(self, bank_ids: torch.Tensor, timesteps: torch.Tensor | None) -> torch.Tensor:
        """Context tokens for a batch.

        Args:
            bank_ids (`torch.LongTensor` of shape `(batch,)`): the bank of each row.
            timesteps (`torch.Tensor` of shape `(batch,)`, *optional*): denoiser timesteps (needed when the timestep
                embedding is on).

        Returns:
            `torch.Tensor`: `(batch, n_tokens, dim)` for UNets, `(batch, n_layers, n_tokens, dim)` for MMDiT.
        """
        if bank_ids.min() < 0 or bank_ids.max() >= self.n_banks:
            raise ValueError(f"bank ids must lie in [0, {self.n_banks - 1}], got {bank_ids.tolist()}.")
        tokens = self.tokens[bank_ids]
        if self.timestep_embedding is None:
            return tokens
        if timesteps is None:
            raise ValueError("These soft tokens have a timestep embedding, so the timesteps are required.")
        step_part = self.timestep_embedding(timestep_buckets(timesteps).to(tokens.device))  # (batch, [L*]D)
        if self.config.architecture == Architecture.UNET.value:
            return tokens + step_part[:, None, :]
        per_layer = torch.stack(step_part.chunk(self.config.n_layers, dim=-1), dim=1)  # (batch, n_layers, D)
        return tokens + per_layer[:, :, None, :]

    def extra_repr(self) -> str:
        """The banks, tokens and width, for `repr`."""
        c = self.config
        return f"architecture={c.architecture}, banks={c.n_banks}, tokens={c.n_tokens}, dim={c.dim}"
