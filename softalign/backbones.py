"""Deprecated: moved to [`softalign.families`], the one home of model-family facts (removed in the next release)."""

import warnings

from .families import *  # noqa: F403
from .families import (  # noqa: F401
    FAMILIES,
    UNET_FAMILIES,
    Backbone,
    SD3Backbone,
    SDXLBackbone,
    UNetBackbone,
    architecture_of,
    backbone_for,
    collapsed_generation,
    collapsed_row,
    context_dim_of,
    denoiser_of,
    family_of,
)

warnings.warn(
    "softalign.backbones is deprecated; import from softalign.families instead.", DeprecationWarning, stacklevel=2
)
