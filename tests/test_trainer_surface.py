"""The three trainers share one surface (TRL-style): `args`, `state` with `global_step` and `log_history`, `train()`
returning a `TrainerState`, `save_model()`, the run config in the output directory, trackers through accelerate; and
one public "alongside" contract (`AlignmentTerm`) that every RL trainer uses the same way."""

import json

import pytest
import torch
from rl_fixtures import brightness, tiny_ddpo_config, tokens_for, white_rejected_preferences
from shapes_data import shapes_pairs

from softalign import AlignmentTerm, SoftAlignConfig, SoftAlignTrainer, TrainerState
from softalign.rl import DDPOTrainer, DiffusionDPOConfig, DiffusionDPOTrainer
from softalign.testing import tiny_pipeline


def prompt():
    return "a photo of a cat", {}


def build(kind: str, out, tracker: str | None = None, **overrides):
    pipe = tiny_pipeline("sd15")
    tracked = {"report_to": tracker} if tracker else {}
    if kind == "softalign":
        args = SoftAlignConfig(
            output_dir=str(out), max_steps=2, resolution=32, save_steps=0, logging_steps=1, **tracked
        )
        return SoftAlignTrainer(pipe, args, shapes_pairs(), **overrides)
    if kind == "ddpo":
        args = tiny_ddpo_config(str(out), num_epochs=1, **({"log_with": tracker} if tracker else {}))
        return DDPOTrainer(args, brightness, prompt, pipe, soft_tokens=tokens_for(pipe, "sd15"), **overrides)
    args = DiffusionDPOConfig(output_dir=str(out), max_steps=2, resolution=32, logging_steps=1, **tracked)
    return DiffusionDPOTrainer(
        pipe, args, white_rejected_preferences(4), soft_tokens=tokens_for(pipe, "sd15"), **overrides
    )


RUN_CONFIGS = {"softalign": "softalign_config.json", "ddpo": "ddpo_config.json", "dpo": "diffusion_dpo_config.json"}


@pytest.mark.parametrize("kind", ["softalign", "ddpo", "dpo"])
def test_the_three_trainers_share_one_surface(kind, tmp_path):
    """Also the defect that `DDPOConfig.log_with` was accepted and ignored and Diffusion-DPO had no tracker."""
    pytest.importorskip("tensorboard")
    trainer = build(kind, tmp_path / "run", tracker="tensorboard")
    assert trainer.args is not None and isinstance(trainer.state, TrainerState)
    assert trainer.state.global_step == 0 and trainer.state.log_history == []
    state = trainer.train()
    assert state is trainer.state and isinstance(state, TrainerState)
    assert state.global_step > 0 and state.log_history and all(isinstance(r, dict) for r in state.log_history)
    config = json.loads((tmp_path / "run" / RUN_CONFIGS[kind]).read_text())
    assert config["output_dir"] == str(tmp_path / "run")
    path = trainer.save_model()
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    assert (path.parent / RUN_CONFIGS[kind]).is_file()
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "no tensorboard event file: trackers unused"


def test_one_alignment_term_for_every_rl_trainer(tmp_path):
    align = build("softalign", tmp_path / "align")
    align.train()
    term = align.alignment_term()
    assert isinstance(term, AlignmentTerm)
    loss = term.loss(0)
    assert loss.requires_grad and loss.ndim == 0
    before = {k: v.clone() for k, v in term.state_dict().items()}
    term.backward(0, weight=1.0)
    align.optimizer.step()
    align.optimizer.zero_grad(set_to_none=True)
    term.after_optimizer_step()
    after = term.state_dict()
    assert not torch.equal(after["ema_tokens.tokens"], before["ema_tokens.tokens"])  # AGSM's EMA follows the step
    term.load_state_dict(before)
    assert all(torch.equal(term.state_dict()[k], v) for k, v in before.items())


def test_diffusion_dpo_alongside_updates_and_checkpoints_the_ema_tokens(tmp_path):
    """Defect: Diffusion-DPO with alongside never updated nor checkpointed the AGSM EMA tokens."""
    align = build("softalign", tmp_path / "align")
    align.train()
    ema_before = align.trained.ema_tokens.tokens.detach().clone()
    pipe, tokens = align.pipe, align.soft_tokens
    args = DiffusionDPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, resolution=32, alongside_weight=0.5)
    dpo = DiffusionDPOTrainer(pipe, args, white_rejected_preferences(4), soft_tokens=tokens, alongside=align)
    dpo.train()
    ema_after = align.trained.ema_tokens.tokens.detach().clone()
    assert not torch.equal(ema_after, ema_before)
    checkpoint = tmp_path / "dpo" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "alongside.safetensors"))
    assert torch.equal(saved["ema_tokens.tokens"], ema_after)
