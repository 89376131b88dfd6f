"""Run by test_lost_rank.py under torchrun (2 processes, gloo): a SoftAlign run with a checkpoint every step.

    two_process_lost_rank.py OUT MAX_STEPS [--kill-rank1-at STEP] [--resume]

With `--kill-rank1-at`, rank 1 SIGKILLs itself at the end of that step, while rank 0 may still be writing its checkpoint.
At the end each rank writes its trained parameters to OUT/final-rank<r>.safetensors.
"""

import argparse
import os
import signal

import torch
from safetensors.torch import save_file
from shapes_data import shapes_pairs

from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("max_steps", type=int)
parser.add_argument("--kill-rank1-at", type=int)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()
torch.set_num_threads(1)


class LoseRankOne:
    def on_step_end(self, trainer, logs):
        if trainer.accelerator.process_index == 1 and logs["step"] == args.kill_rank1_at:
            os.kill(os.getpid(), signal.SIGKILL)


config = SoftAlignConfig(
    output_dir=args.out,
    max_steps=args.max_steps,
    resolution=32,
    save_steps=1,
    logging_steps=1,
    resume_from_checkpoint="latest" if args.resume else None,
)
callbacks = [LoseRankOne()] if args.kill_rank1_at else []
trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config, shapes_pairs(), callbacks=callbacks)
trainer.train()
assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
save_file(trainer.trained.state_dict(), f"{args.out}/final-rank{trainer.accelerator.process_index}.safetensors")
