"""Run by test_multiprocess.py under torchrun (2 processes, gloo on CPU): `two_process_train.py <out_dir> [family]`;
train, then each rank writes its tokens."""

import sys

import torch
from safetensors.torch import save_file
from shapes_data import shapes_pairs

from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline

torch.set_num_threads(1)
out = sys.argv[1]
family = sys.argv[2] if len(sys.argv) > 2 else "sd15"
config = SoftAlignConfig(output_dir=out, max_steps=3, resolution=32, save_steps=0, logging_steps=1)
trainer = SoftAlignTrainer(tiny_pipeline(family), config, shapes_pairs())
trainer.train()
rank = trainer.accelerator.process_index
save_file(trainer.trained.state_dict(), f"{out}/rank{rank}.safetensors")
assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
