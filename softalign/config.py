"""Deprecated: moved to [`softalign.softalign_config`] (removed in the next release)."""

import warnings

from .softalign_config import CHOICES, FAMILY_DEFAULTS, SoftAlignConfig  # noqa: F401

warnings.warn(
    "softalign.config is deprecated; import SoftAlignConfig from softalign (or softalign.softalign_config).",
    DeprecationWarning,
    stacklevel=2,
)
