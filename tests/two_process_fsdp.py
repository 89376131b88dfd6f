"""Run by test_multiprocess.py under torchrun (2 processes, gloo on CPU): `two_process_fsdp.py <out_dir> <family>`.

Shards the frozen denoiser with torch's FSDP2 (`fully_shard` per block, then the whole model), with soft tokens
attached: each rank writes its forward output, its tokens' gradient and how many weights it holds.
"""

import sys

import torch
import torch.distributed as dist
from helpers import denoiser_inputs
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
from softalign.families import context_dim_of, denoiser_of
from softalign.testing import tiny_pipeline

torch.set_num_threads(1)
out, family = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
pipe = tiny_pipeline(family)
denoiser = denoiser_of(pipe).requires_grad_(False)
tokens = SoftTokens(SoftTokensConfig.for_family(family, dim=context_dim_of(pipe)))
attach_soft_tokens(pipe, tokens)
inputs = denoiser_inputs(pipe)
with torch.no_grad():
    unsharded = denoiser(**inputs).sample
full = sum(p.numel() for p in denoiser.parameters())
for block in list(denoiser.transformer_blocks) + list(getattr(denoiser, "single_transformer_blocks", [])):
    fully_shard(block)
fully_shard(denoiser)
sharded = denoiser(**inputs).sample
sharded.square().mean().backward()
local = sum(p.to_local().numel() for p in denoiser.parameters())
save_file(
    {
        "unsharded": unsharded,
        "sharded": sharded.detach(),
        "grad": tokens.tokens.grad,
        "numel": torch.tensor([local, full]),
    },
    f"{out}/fsdp-rank{rank}.safetensors",
)
dist.destroy_process_group()
