"""softalign: reward-free soft-token alignment (AGSM, SoftREPA) and RL post-training for diffusion models."""

from .alignment_term import AlignmentTerm
from .convert import convert_official_tokens, load_foreign_tensor
from .families import family_of
from .injection import SoftTokenInjection, attach_soft_tokens, injection_of
from .loaders import (
    load_lora,
    load_pipeline,
    load_soft_tokens,
    lora_config,
    read_soft_tokens,
    save_soft_tokens,
    unload_soft_tokens,
)
from .soft_tokens import SoftTokens, SoftTokensConfig
from .softalign_config import SoftAlignConfig
from .softalign_trainer import SoftAlignTrainer
from .training import TrainerState
from .version import __version__

__all__ = [
    "AlignmentTerm",
    "SoftAlignConfig",
    "SoftAlignTrainer",
    "SoftTokenInjection",
    "SoftTokens",
    "SoftTokensConfig",
    "TrainerState",
    "__version__",
    "attach_soft_tokens",
    "convert_official_tokens",
    "family_of",
    "injection_of",
    "load_foreign_tensor",
    "load_lora",
    "load_pipeline",
    "load_soft_tokens",
    "lora_config",
    "read_soft_tokens",
    "save_soft_tokens",
    "unload_soft_tokens",
]
