"""softalign: reward-free soft-token alignment (AGSM, SoftREPA) and RL post-training for diffusion models."""

from .config import SoftAlignConfig  # noqa: E402
from .convert import convert_official_tokens, load_foreign_tensor  # noqa: E402
from .families import family_of  # noqa: E402
from .injection import SoftTokenInjection, attach_soft_tokens, injection_of  # noqa: E402
from .loaders import load_soft_tokens, read_soft_tokens, save_soft_tokens, unload_soft_tokens  # noqa: E402
from .soft_tokens import SoftTokens, SoftTokensConfig  # noqa: E402
from .trainer import SoftAlignTrainer  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "SoftAlignConfig",
    "SoftAlignTrainer",
    "SoftTokenInjection",
    "SoftTokens",
    "SoftTokensConfig",
    "__version__",
    "attach_soft_tokens",
    "convert_official_tokens",
    "family_of",
    "injection_of",
    "load_foreign_tensor",
    "load_soft_tokens",
    "read_soft_tokens",
    "save_soft_tokens",
    "unload_soft_tokens",
]
