"""Run by test_crash_resume.py (and scripts/reliability_report.py) as a subprocess whose runs get killed with SIGKILL.

    python tests/crash_train.py {softalign|ddpo} OUTPUT_DIR RESULT_FILE STEPS     # one run (one "life")
    python tests/crash_train.py --serve                                          # a fork server of lives

A life is a tiny sd15 run that always starts with `resume_from_checkpoint="latest"` (SoftAlign) / `resume_from=
"latest"` (DDPO) and checkpoints after every step / epoch. It reports on stdout, one flushed line each:

- `resumed checkpoint-N` when it loads a checkpoint,
- `step N` when step N (SoftAlign: optimiser steps, 1-based) or epoch N (DDPO: after its sampling, 0-based) is reached,
- `saved checkpoint-N` once checkpoint N is published (renamed into place),
- `done` after the final trainable state is written to RESULT_FILE (safetensors, every tensor of
  `trainer.trained.state_dict()`).

With `kill_in_save=N` (`CRASH_KILL_IN_SAVE=N` in the environment for a single run), the life SIGKILLs itself while
checkpoint N is being written (its files are in the staging directory; the integrity record and the rename are still
to come).

`--serve` imports torch, diffusers and softalign once and then, for each JSON line on stdin
(`{"kind", "output_dir", "result", "steps", "log", "kill_in_save"}`), forks a life with its stderr in `log`, prints
`pid <pid>`, waits for it and prints `exit <code>` (negative: killed by that signal). Each life is its own process
(its own locks, files and death); the fork only saves the 3-5 s of imports per life.
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

    from softalign.softalign_config import SoftAlignConfig
    from softalign.softalign_trainer import SoftAlignTrainer
    from softalign.testing import tiny_pipeline

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


def prompt_fn():
    return random.choice(PROMPTS), {}  # the global generator, pinned by the trainer per batch


def ddpo_trainer(output_dir: str, epochs: int):
    from rl_fixtures import brightness, gaussian_lora, tiny_ddpo_config, tokens_for

    from softalign.rl.ddpo_trainer import DDPOTrainer
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    torch.manual_seed(0)  # the same initial tokens and LoRA in every process
    tokens = tokens_for(pipe, "sd15")
    lora = gaussian_lora()
    config = tiny_ddpo_config(output_dir, num_epochs=epochs, save_freq=1, num_checkpoint_limit=2, resume_from="latest")
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
    import softalign.training as checkpoints

    write_integrity = checkpoints.write_integrity

    def die_first(directory):
        if directory.name.startswith(f".checkpoint-{step}.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        write_integrity(directory)

    checkpoints.write_integrity = die_first


def life(kind: str, output_dir: str, result: str, steps: int, kill_in_save: int | None = None) -> None:
    from safetensors.torch import save_file

    if kill_in_save is not None:
        kill_while_saving(kill_in_save)
    trainer = softalign_trainer(output_dir, steps) if kind == "softalign" else ddpo_trainer(output_dir, steps)
    load = trainer._load_checkpoint

    def load_and_report(path):
        load(path)
        say(f"resumed {path.name}")

    trainer._load_checkpoint = load_and_report
    trainer.train()
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.trained.state_dict().items()}
    save_file(state, result + ".tmp")
    os.replace(result + ".tmp", result)
    say("done")


def serve() -> None:
    import json
    import traceback

    import accelerate  # noqa: F401  (imports paid once, before any fork)
    import diffusers.optimization  # noqa: F401
    import peft  # noqa: F401
    import rl_fixtures  # noqa: F401
    import safetensors.torch  # noqa: F401
    import shapes_data  # noqa: F401
    import tqdm.auto  # noqa: F401

    import softalign.rl.ddpo_trainer  # noqa: F401
    import softalign.softalign_trainer  # noqa: F401
    from softalign.testing import tiny_pipeline

    tiny_pipeline("sd15")  # builds and caches the tokenizer; every life still builds its own pipeline
    say("ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 2)
                life(job["kind"], job["output_dir"], job["result"], job["steps"], job.get("kill_in_save"))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        kill = os.environ.get("CRASH_KILL_IN_SAVE")
        life(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(kill) if kill else None)
