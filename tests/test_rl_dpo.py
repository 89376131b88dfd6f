import math

import pytest
import torch
from PIL import Image
from rl_fixtures import tokens_for, white_rejected_preferences
from shapes_data import shapes_pairs

from softalign.objectives import diffusion_dpo_loss
from softalign.rl.ddpo_config import DDPOConfig
from softalign.rl.ddpo_trainer import DDPOTrainer
from softalign.rl.diffusion_dpo_trainer import DiffusionDPOConfig, DiffusionDPOTrainer
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline


def test_dpo_loss_formula_and_types():
    w, lose = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1])
    rw, rl = torch.tensor([0.3, 0.3]), torch.tensor([0.3, 0.3])
    terms = diffusion_dpo_loss(w, lose, rw, rl, beta=10.0)
    inside = [-5.0 * (-0.2 - 0.0), -5.0 * (0.4 - 0.0)]
    expected = sum(-math.log(1 / (1 + math.exp(-x))) for x in inside) / 2
    assert terms.loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms.implicit_accuracy.item() == 0.5
    ipo = diffusion_dpo_loss(w, lose, rw, rl, beta=10.0, loss_type="ipo")
    assert ipo.loss.item() == pytest.approx(sum((x - 0.5) ** 2 for x in inside) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(w, lose, rw, rl, beta=1.0, loss_type="kto")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_loss_is_ln2_at_initialisation_with_tokens_and_lora(family, tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline(family)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"])  # B = 0: the identity at first
    trainer = DiffusionDPOTrainer(
        pipe,
        DiffusionDPOConfig(output_dir=str(tmp_path), max_steps=1, resolution=32),
        white_rejected_preferences(4),
        soft_tokens=tokens_for(pipe, family),
        peft_config=lora,
    )
    trainer.prepare_data()
    logs = trainer._micro_step(0, 0)
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_a_toy_preference(loss_type, tmp_path):
    pipe = tiny_pipeline("sd15")
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path),
        max_steps=40,
        resolution=32,
        beta=5000.0,
        learning_rate=1e-2,
        loss_type=loss_type,
        logging_steps=1,
        train_batch_size=8,
    )
    trainer = DiffusionDPOTrainer(pipe, args, white_rejected_preferences(8), soft_tokens=tokens_for(pipe, "sd15"))
    trainer.prepare_data()

    def held_out_loss():  # the same pairs, t and noise before and after training
        values = [trainer._micro_step(10_000 + k, 0)["loss"] for k in range(6)]
        trainer.optimizer.zero_grad(set_to_none=True)
        return sum(values) / len(values)

    before = held_out_loss()
    trainer.train()
    after = held_out_loss()
    assert after < before, (before, after)


def test_chaining_softalign_ddpo_and_dpo_on_one_set_of_tokens(tmp_path):
    pipe = tiny_pipeline("sd15")
    stage1 = SoftAlignTrainer(
        pipe, SoftAlignConfig(output_dir=str(tmp_path / "1"), max_steps=2, resolution=32, save_steps=0), shapes_pairs()
    )
    stage1.train()
    tokens = stage1.soft_tokens
    snapshots = [tokens.tokens.detach().clone()]
    DDPOTrainer(
        DDPOConfig(
            output_dir=str(tmp_path / "2"),
            num_epochs=1,
            sample_num_steps=2,
            sample_batch_size=2,
            sample_num_batches_per_epoch=1,
            train_batch_size=2,
            resolution=32,
        ),
        lambda i, p, m: (i.mean(dim=(1, 2, 3)), {}),
        lambda: ("a photo of a star", {}),
        pipe,
        soft_tokens=tokens,
    ).train()
    snapshots.append(tokens.tokens.detach().clone())
    dpo = DiffusionDPOTrainer(
        pipe,
        DiffusionDPOConfig(output_dir=str(tmp_path / "3"), max_steps=2, resolution=32, alongside_weight=0.5),
        white_rejected_preferences(4),
        soft_tokens=tokens,
        alongside=stage1,
    )
    dpo.train()
    snapshots.append(tokens.tokens.detach().clone())
    assert not torch.equal(snapshots[0], snapshots[1]) and not torch.equal(snapshots[1], snapshots[2])
    assert dpo.trained.injection is stage1.trained.injection  # one attachment, shared by every stage


def test_bad_preference_rows_are_named(tmp_path):
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ValueError, match="preference pair 0: expected keys 'caption', 'chosen' and 'rejected'"):
        DiffusionDPOTrainer(
            pipe, DiffusionDPOConfig(output_dir=str(tmp_path)), [{"caption": "x"}], soft_tokens=tokens_for(pipe, "sd15")
        )
    with pytest.raises(ValueError, match="the caption is empty"):
        DiffusionDPOTrainer(
            pipe,
            DiffusionDPOConfig(output_dir=str(tmp_path)),
            [{"caption": " ", "chosen": Image.new("RGB", (8, 8)), "rejected": Image.new("RGB", (8, 8))}],
            soft_tokens=tokens_for(pipe, "sd15"),
        )


def test_fewer_pairs_than_one_batch_is_named(tmp_path):
    pipe = tiny_pipeline("sd15")
    trainer = DiffusionDPOTrainer(
        pipe,
        DiffusionDPOConfig(output_dir=str(tmp_path), train_batch_size=4, max_steps=1),
        white_rejected_preferences(3),
        soft_tokens=tokens_for(pipe, "sd15"),
    )
    with pytest.raises(ValueError, match=r"3 preference pairs, fewer than one batch \(4 per process x 1 processes\)"):
        trainer.train()
