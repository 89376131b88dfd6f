"""Deprecated: moved to [`softalign.softalign_trainer`] (removed in the next release)."""

import warnings

from .softalign_trainer import AlignmentTerm, SoftAlignTrainer  # noqa: F401
from .training import TrainerState  # noqa: F401

warnings.warn(
    "softalign.trainer is deprecated; import SoftAlignTrainer from softalign (or softalign.softalign_trainer).",
    DeprecationWarning,
    stacklevel=2,
)
