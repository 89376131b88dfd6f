"""`objective="diffusion"`: the plain fine-tuning baseline on the same data, cache, resume and logging."""

import copy

import pytest
import torch
from shapes_data import shapes_pairs

from softalign.loaders import lora_config
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline

PAIRS = shapes_pairs()


def _config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), objective="diffusion", max_steps=2, resolution=32, save_steps=0)
    return SoftAlignConfig(**{**settings, "logging_steps": 1, **overrides})


def test_loss_is_each_images_mse_averaged_with_its_own_t_and_noise(tmp_path):
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), _config(tmp_path, train_batch_size=4, chunk_size=3), PAIRS)
    trainer.prepare_data()
    seen = {}
    real_target = trainer.backbone.training_target

    def training_target(x0, noise, t):
        seen["target"], seen["t"] = real_target(x0, noise, t), t
        return seen["target"]

    def predict(noisy, timesteps, conditioning):
        seen.setdefault("rows", []).append(len(noisy))
        return torch.full_like(noisy, 0.25)  # a constant prediction: the loss is then known by hand

    trainer.backbone.training_target, trainer.backbone.predict = training_target, predict
    losses = [loss for loss, _, _ in trainer._chunk_losses(0, 0)]
    target = seen["target"]
    by_hand = sum(((0.25 - target[i]) ** 2).mean() for i in range(4)) / 4
    assert torch.allclose(torch.stack(losses).sum(), by_hand)
    assert seen["rows"] == [3, 1]  # matched pairs only: one denoiser row per image, in chunks of 3
    assert len(set(seen["t"].tolist())) > 1  # each image its own timestep ...
    assert not torch.equal(target[0], target[1])  # ... and its own noise (epsilon target = noise)


@pytest.mark.parametrize("lora", [False, True])
def test_short_run_trains_tokens_or_lora_and_nothing_else(lora, tmp_path):
    pipe = tiny_pipeline("sd15")
    frozen = copy.deepcopy(pipe.unet.state_dict())
    trainer = SoftAlignTrainer(pipe, _config(tmp_path), PAIRS, peft_config=lora_config() if lora else None)
    before = [p.detach().clone() for p in trainer.trained.parameters()]
    state = trainer.train()
    after = trainer.trained.parameters()
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert state.global_step == 2 and "loss" in state.log_history[-1]
    assert trainer.batch_summary()["pairs_per_step"] == trainer.batch_summary()["images_per_step"]
    for name, value in pipe.unet.state_dict().items():
        if "lora" not in name and name in frozen:
            assert torch.equal(value, frozen[name]), name
    if not lora:
        assert trainer.soft_tokens.n_banks == 1  # AGSM's layout, one bank
