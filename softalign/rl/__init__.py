"""RL post-training with soft tokens and/or LoRA: sampler steps with log-probabilities, rewards, and
`softalign.rl.trl` (needs trl==0.23.1), which adapts trl's DDPO / AlignProp trainers."""

from .ddpo_config import DDPOConfig
from .ddpo_trainer import DDPOTrainer
from .diffusion_dpo_config import DiffusionDPOConfig
from .diffusion_dpo_trainer import DiffusionDPOTrainer
from .rewards import GenEvalReward, dense_score, jpeg_compressibility
from .samplers import ddim_step_with_logprob, flow_sde_step_with_logprob

__all__ = [
    "DDPOConfig",
    "DDPOTrainer",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "GenEvalReward",
    "SoftAlignAlignPropTrainer",
    "SoftAlignDDPOTrainer",
    "SoftTokenDDPOStableDiffusionPipeline",
    "TrainableLayers",
    "ddim_step_with_logprob",
    "dense_score",
    "flow_sde_step_with_logprob",
    "jpeg_compressibility",
]

_FROM_TRL_ADAPTER = frozenset(
    ["SoftAlignAlignPropTrainer", "SoftAlignDDPOTrainer", "SoftTokenDDPOStableDiffusionPipeline", "TrainableLayers"]
)


def __getattr__(name):
    # trl is an optional extra (`softalign[trl]`): import it only when one of its adapters is asked for.
    if name in _FROM_TRL_ADAPTER:
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
