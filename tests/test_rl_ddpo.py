import copy

import pytest
import torch
from rl_fixtures import brightness, gaussian_lora, tiny_ddpo_config, tokens_for
from shapes_data import shapes_pairs

from softalign.families import denoiser_of
from softalign.rl.ddpo_trainer import DDPOTrainer
from softalign.rl.stat_tracking import PerPromptStatTracker
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline

PROMPTS = ["a photo of a cat", "a photo of two dogs"]


class Prompts:
    """Draws from the global `random` state, as TRL examples do (the trainer pins it per batch)."""

    def __call__(self):
        import random

        return random.choice(PROMPTS), {}


def config(tmp_path, **overrides):
    return tiny_ddpo_config(str(tmp_path / "ddpo"), **overrides)


@pytest.mark.parametrize(
    "family, train_tokens, train_lora",
    [
        ("sd15", True, False),
        ("sdxl", True, False),
        ("sd3", True, False),
        ("sd15", False, True),
        ("sd15", True, True),
        ("sd3", False, True),
        ("sd35", True, False),
        ("flux", True, False),
        ("flux", False, True),
    ],
)
def test_ddpo_trains_exactly_the_chosen_parameters(family, train_tokens, train_lora, tmp_path):
    pipe = tiny_pipeline(family)
    base = copy.deepcopy({k: v for k, v in denoiser_of(pipe).state_dict().items()})
    tokens = tokens_for(pipe, family) if train_tokens else None
    trainer = DDPOTrainer(
        config(tmp_path),
        brightness,
        Prompts(),
        pipe,
        soft_tokens=tokens,
        peft_config=gaussian_lora() if train_lora else None,
    )
    initial = {k: v.clone() for k, v in trainer.trained.state_dict().items()}
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    final = trainer.trained.state_dict()
    if train_tokens:
        assert not torch.equal(final["soft_tokens.tokens"][0], initial["soft_tokens.tokens"][0])
    lora_keys = [k for k in final if k.startswith("lora.") and "lora_B" in k]
    assert bool(lora_keys) == train_lora
    assert all(not torch.equal(final[k], initial[k]) for k in lora_keys)
    for name, value in denoiser_of(pipe).state_dict().items():
        if "lora" not in name:  # PEFT renames wrapped weights `x.base_layer.weight`
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name


@pytest.mark.parametrize(
    "family, kl_coef",
    [("sd15", 0.0), ("sd15", 1.0), ("sd35", 0.0), pytest.param("flux", 1.0, marks=pytest.mark.slow)],  # flux: ~15 s
)
def test_resumed_ddpo_equals_an_uninterrupted_run(family, kl_coef, tmp_path):
    whole = DDPOTrainer(
        config(tmp_path / "a", num_epochs=3, kl_coef=kl_coef),
        brightness,
        Prompts(),
        (p := tiny_pipeline(family)),
        soft_tokens=tokens_for(p, family),
        peft_config=gaussian_lora(),
    )
    whole.train()
    first = DDPOTrainer(
        config(tmp_path / "b", num_epochs=3, kl_coef=kl_coef),
        brightness,
        Prompts(),
        (q := tiny_pipeline(family)),
        soft_tokens=tokens_for(q, family),
        peft_config=gaussian_lora(),
    )
    first.train(epochs=2)
    resumed = DDPOTrainer(
        config(tmp_path / "b", num_epochs=3, resume_from="latest", kl_coef=kl_coef),
        brightness,
        Prompts(),
        (r := tiny_pipeline(family)),
        soft_tokens=tokens_for(r, family),
        peft_config=gaussian_lora(),
    )
    before = {k: v.clone() for k, v in resumed.trained.state_dict().items()}
    resumed.train()
    after = resumed.trained.state_dict()
    assert resumed.epoch == 3 and any(not torch.equal(after[k], before[k]) for k in after)  # it trained again
    for name, value in whole.trained.state_dict().items():
        assert torch.equal(value, after[name]), name


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_kl_penalty_alone_pulls_the_parameters_back_to_the_reference(family, tmp_path):
    """With a constant reward every advantage is 0, so the KL term is the whole loss and its only effect."""
    pipe = tiny_pipeline(family)
    trainer = DDPOTrainer(
        config(tmp_path, num_epochs=3, kl_coef=2.0, train_learning_rate=3e-3),
        lambda images, prompts, metadata: (torch.ones(len(prompts)), {}),
        Prompts(),
        pipe,
        soft_tokens=tokens_for(pipe, family),
        peft_config=gaussian_lora(),
    )
    reference = [p.clone() for p in trainer.reference]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    history = trainer.train(epochs=3)
    assert history[0]["kl"] > 0 and history[-1]["kl"] < 0.7 * history[0]["kl"]  # the policy returns to the reference
    for record in history:
        assert record["loss"] == pytest.approx(2.0 * record["kl"], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(trainer.reference, reference, strict=True))  # never trained


def test_kl_resume_needs_the_reference_it_was_trained_against(tmp_path):
    pipe = tiny_pipeline("sd15")
    DDPOTrainer(config(tmp_path, num_epochs=1), brightness, Prompts(), pipe, peft_config=gaussian_lora()).train()
    pipe = tiny_pipeline("sd15")
    resumed = DDPOTrainer(
        config(tmp_path, num_epochs=2, resume_from="latest", kl_coef=1.0),
        brightness,
        Prompts(),
        pipe,
        peft_config=gaussian_lora(),
    )
    with pytest.raises(ValueError, match="reference.safetensors"):
        resumed.train()


def test_alongside_term_and_chaining_on_one_set_of_tokens(tmp_path):
    pipe = tiny_pipeline("sd15")
    align = SoftAlignTrainer(
        pipe, SoftAlignConfig(output_dir=str(tmp_path / "s1"), max_steps=2, resolution=32, save_steps=0), shapes_pairs()
    )
    align.train()
    tokens = align.soft_tokens
    after_stage1 = tokens.state_dict()["tokens"].clone()
    ddpo = DDPOTrainer(
        config(tmp_path, num_epochs=1, alongside_weight=1.0),
        brightness,
        Prompts(),
        pipe,
        soft_tokens=tokens,
        alongside=align,
    )
    ddpo.train()
    moved = tokens.state_dict()["tokens"]
    assert not torch.equal(moved[0], after_stage1[0])  # DDPO and AGSM both train psi+
    assert not torch.equal(moved[1], after_stage1[1])  # psi- only learns from the alongside AGSM term
    with pytest.raises(ValueError, match="needs an `alongside` SoftAlignTrainer"):
        DDPOTrainer(
            config(tmp_path / "x", alongside_weight=1.0),
            brightness,
            Prompts(),
            tiny_pipeline("sd15"),
            soft_tokens=tokens_for(pipe, "sd15"),
        )


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda i, p, m: (torch.zeros(3), {}), "returned 3 rewards for 2 images"),
        (lambda i, p, m: (torch.tensor([0.0, float("nan")]), {}), "non-finite rewards"),
    ],
)
def test_bad_rewards_are_refused(reward, message, tmp_path):
    pipe = tiny_pipeline("sd15")
    trainer = DDPOTrainer(config(tmp_path), reward, Prompts(), pipe, soft_tokens=tokens_for(pipe, "sd15"))
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_image_hook_runs_without_a_tracker_and_stat_tracking(tmp_path):
    seen = []
    pipe = tiny_pipeline("sd15")
    trainer = DDPOTrainer(
        config(tmp_path, num_epochs=1, per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=1),
        brightness,
        Prompts(),
        pipe,
        soft_tokens=tokens_for(pipe, "sd15"),
        image_samples_hook=lambda p, i, e: seen.append(i.shape),
    )
    trainer.train()
    assert seen == [(4, 3, 32, 32)]
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    advantages = tracker.update(["a", "a", "b"], [1.0, 3.0, 5.0])
    assert advantages[:2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)  # "a": its own mean 2, std 1
    assert advantages[2] == pytest.approx((5 - 3) / (1.632993 + 1e-6), rel=1e-4)  # "b": too few, batch stats


def test_save_model_then_load_reproduces_the_trained_pipeline(tmp_path):
    from softalign.loaders import load_adapters, load_lora

    pipe = tiny_pipeline("sd15")
    trainer = DDPOTrainer(
        config(tmp_path, num_epochs=1),
        brightness,
        Prompts(),
        pipe,
        soft_tokens=tokens_for(pipe, "sd15"),
        peft_config=gaussian_lora(),
    )
    trainer.train()
    adapter = trainer.save_model()
    assert adapter == tmp_path / "ddpo" / "adapter"
    fresh = tiny_pipeline("sd15")
    load_adapters(fresh, soft_tokens=adapter, lora=tmp_path / "ddpo" / "lora" / "softalign")  # what the CLIs call
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
    trained = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    loaded = fresh("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(trained, loaded)
    untouched = tiny_pipeline("sd15")("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.equal(untouched, loaded)
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapter: expected pytorch_lora_weights.safetensors"):
        load_lora(fresh, tmp_path)


def test_the_unguided_prediction_runs_under_autocast_too(tmp_path):
    """Defect: with guidance off, DDPOTrainer's prediction skipped the accelerator's autocast (mixed precision)."""
    import contextlib

    pipe = tiny_pipeline("sd15")
    trainer = DDPOTrainer(config(tmp_path), brightness, Prompts(), pipe, soft_tokens=tokens_for(pipe, "sd15"))
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        yield

    trainer.accelerator.autocast = autocast
    conditioning = trainer._conditioning(["a photo of a cat"])
    latents = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        for guidance in (True, False):
            entered.clear()
            output = trainer._predict(latents, torch.tensor([10]), conditioning, guidance=guidance)
            assert entered and output.dtype == torch.float32, guidance
