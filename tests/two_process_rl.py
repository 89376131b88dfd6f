"""Run by test_multiprocess.py under torchrun (2 processes, gloo on CPU):
`two_process_rl.py <ddpo|dpo> <out_dir> [family]`.

Trains soft tokens and a LoRA with the DDPO or the Diffusion-DPO trainer; each rank writes its trainable state before
(`<kind>-init-rank{r}.safetensors`) and after (`<kind>-rank{r}.safetensors`) training.
"""

import random
import sys

import torch
from peft import LoraConfig
from rl_fixtures import brightness, gaussian_lora, tiny_ddpo_config, tokens_for, white_rejected_preferences
from safetensors.torch import save_file

from softalign.rl.ddpo_trainer import DDPOTrainer
from softalign.rl.diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from softalign.testing import tiny_pipeline

torch.set_num_threads(1)
kind, out = sys.argv[1], sys.argv[2]
family = sys.argv[3] if len(sys.argv) > 3 else "sd15"
PROMPTS = ["a photo of a cat", "a photo of two dogs"]


def prompt_fn():
    return random.choice(PROMPTS), {}


pipe = tiny_pipeline(family)
tokens = tokens_for(pipe, family)
if kind == "ddpo":
    config = tiny_ddpo_config(f"{out}/ddpo")
    trainer = DDPOTrainer(config, brightness, prompt_fn, pipe, soft_tokens=tokens, peft_config=gaussian_lora())
elif kind == "dpo":
    pairs = white_rejected_preferences(8)
    args = DiffusionDPOConfig(
        output_dir=f"{out}/dpo", max_steps=3, resolution=32, learning_rate=1e-2, train_batch_size=2, logging_steps=1
    )
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"])  # B = 0 at first
    trainer = DiffusionDPOTrainer(pipe, args, pairs, soft_tokens=tokens, peft_config=lora)
else:
    raise SystemExit(f"kind must be ddpo or dpo, got {kind!r}")

assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
rank = trainer.accelerator.process_index
save_file(trainer.trained.state_dict(), f"{out}/{kind}-init-rank{rank}.safetensors")
trainer.train()
save_file(trainer.trained.state_dict(), f"{out}/{kind}-rank{rank}.safetensors")
