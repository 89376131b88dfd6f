"""Deprecated: split into [`softalign.rl.diffusion_dpo_config`] and [`softalign.rl.diffusion_dpo_trainer`]
(removed in the next release)."""

import warnings

from .diffusion_dpo_config import DiffusionDPOConfig  # noqa: F401
from .diffusion_dpo_trainer import DiffusionDPOTrainer, preference_examples  # noqa: F401

warnings.warn(
    "softalign.rl.dpo_trainer is deprecated; import from softalign.rl (or softalign.rl.diffusion_dpo_trainer).",
    DeprecationWarning,
    stacklevel=2,
)
