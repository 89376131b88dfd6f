"""Run by test_crash_resume.py (and scripts/reliability_report.py) as a subprocess that gets killed with SIGKILL.

    python tests/crash_train.py {softalign|ddpo} OUTPUT_DIR RESULT_FILE STEPS

A tiny sd15 run that always starts with `resume_from_checkpoint="latest"` (SoftAlign) / `resume_from="latest"` (DDPO)
and checkpoints after every step / epoch. It reports on stdout, one flushed line each:

- `resumed checkpoint-N` when it loads a checkpoint,
- `step N` when step N (SoftAlign: optimiser steps, 1-based) or epoch N (DDPO: after its sampling, 0-based) is reached,
- `saved checkpoint-N` once checkpoint N is published (renamed into place),
- `done` after the final trainable state is written to RESULT_FILE (safetensors, every tensor of
  `trainer.trainable.state_dict()`).

With `CRASH_KILL_IN_SAVE=N` in the environment, the process SIGKILLs itself while checkpoint N is being written (its
files are in the staging directory, the integrity record and the rename are still to come).
"""

from __future__ import annotations

import os
import random
import signal
import sys

import torch

torch.set_num_threads(1)

PROMPTS = ["a photo of a cat", "a photo of two dogs", "a red circle"]


def say(message: str) -> None:
    print(message, flush=True)


def softalign_trainer(output_dir: str, steps: int):
    from shapes_data import shapes_pairs

    from softalign.config import SoftAlignConfig
    from softalign.testing import tiny_pipeline
    from softalign.trainer import SoftAlignTrainer

    class Report:
        def on_step_end(self, trainer, logs):
            say(f"step {logs['step']}")

        def on_save(self, trainer, path):
            say(f"saved {path.name}")

    config = SoftAlignConfig(
        output_dir=output_dir,
        max_steps=steps,
        save_steps=1,
        save_total_limit=2,
        logging_steps=1,
        resolution=32,
        train_batch_size=4,
        lr_scheduler="cosine",
        resume_from_checkpoint="latest",
    )
    return SoftAlignTrainer(tiny_pipeline("sd15"), config, shapes_pairs(), callbacks=[Report()])


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def prompt_fn():
    return random.choice(PROMPTS), {}  # the global generator, pinned by the trainer per batch


def ddpo_trainer(output_dir: str, epochs: int):
    from peft import LoraConfig

    from softalign import SoftTokens, SoftTokensConfig
    from softalign.backbones import context_dim_of
    from softalign.rl.ddpo_config import DDPOConfig
    from softalign.rl.ddpo_trainer import DDPOTrainer
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    torch.manual_seed(0)  # the same initial tokens and LoRA in every process
    tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=context_dim_of(pipe), init="normal"))
    lora = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])
    config = DDPOConfig(
        output_dir=output_dir,
        num_epochs=epochs,
        sample_num_steps=3,
        sample_batch_size=2,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        resolution=32,
        train_learning_rate=1e-2,
        save_freq=1,
        num_checkpoint_limit=2,
        resume_from="latest",
    )
    trainer = DDPOTrainer(
        config,
        brightness,
        prompt_fn,
        pipe,
        soft_tokens=tokens,
        peft_config=lora,
        image_samples_hook=lambda prompts, images, epoch: say(f"step {epoch}"),
    )
    save = trainer.save_checkpoint

    def save_and_report():
        path = save()
        if path is not None:
            say(f"saved {path.name}")
        return path

    trainer.save_checkpoint = save_and_report
    return trainer


def kill_while_saving(step: int) -> None:
    import softalign.checkpoints as checkpoints

    write_integrity = checkpoints.write_integrity

    def die_first(directory):
        if directory.name.startswith(f".checkpoint-{step}.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        write_integrity(directory)

    checkpoints.write_integrity = die_first


def main(kind: str, output_dir: str, result: str, steps: int) -> None:
    from safetensors.torch import save_file

    if os.environ.get("CRASH_KILL_IN_SAVE"):
        kill_while_saving(int(os.environ["CRASH_KILL_IN_SAVE"]))
    trainer = softalign_trainer(output_dir, steps) if kind == "softalign" else ddpo_trainer(output_dir, steps)
    load = trainer._load_checkpoint

    def load_and_report(path):
        load(path)
        say(f"resumed {path.name}")

    trainer._load_checkpoint = load_and_report
    trainer.train()
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.trainable.state_dict().items()}
    save_file(state, result + ".tmp")
    os.replace(result + ".tmp", result)
    say("done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
