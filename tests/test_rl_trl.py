"""softalign.rl.trl with the real trl 0.23.1 DDPOTrainer / AlignPropTrainer on the tiny SD1.x pipeline."""

import pytest
import torch

pytest.importorskip("trl")

from accelerate.state import AcceleratorState  # noqa: E402
from helpers import denoiser_inputs  # noqa: E402
from trl import AlignPropConfig, DDPOConfig, DDPOTrainer  # noqa: E402

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens, load_soft_tokens  # noqa: E402
from softalign.rl import (  # noqa: E402
    SoftAlignAlignPropTrainer,
    SoftAlignDDPOTrainer,
    SoftTokenDDPOStableDiffusionPipeline,
    TrainableLayers,
)
from softalign.testing import tiny_pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_and_a_fresh_accelerator_state():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    AcceleratorState._reset_state()  # trl's Accelerator settings must not leak into later tests


def brightness(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}  # float: trl turns rewards into numpy, which has no bfloat16


def prompt_fn():
    return "a photo of a cat", {}


def make_pipeline(tokens_seed=1, **kwargs):
    pipe = tiny_pipeline("sd15")
    torch.manual_seed(tokens_seed)
    tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=pipe.unet.config.cross_attention_dim, init="normal"))
    return SoftTokenDDPOStableDiffusionPipeline.from_pipeline(pipe, soft_tokens=tokens, **kwargs)


def run_config(tmp_path, cls=DDPOConfig, **overrides):
    settings = dict(
        num_epochs=2,
        sample_num_steps=2,
        train_batch_size=2,
        mixed_precision="no",
        train_adam_weight_decay=0.0,  # so that any change of a parameter means a gradient reached it
        save_freq=100,  # no checkpoints unless a test asks
        logdir=str(tmp_path / "logs"),
        project_kwargs=dict(project_dir=str(tmp_path / "run"), automatic_checkpoint_naming=True),
    )
    if cls is DDPOConfig:
        settings.update(sample_batch_size=2, sample_num_batches_per_epoch=1)
    settings.update(overrides)
    return cls(**settings)


def ddpo(ddpo_pipe, tmp_path, trainer_cls=SoftAlignDDPOTrainer, hook=None, trainer_kwargs=None, **config):
    return trainer_cls(
        run_config(tmp_path, **config),
        brightness,
        prompt_fn,
        ddpo_pipe,
        image_samples_hook=hook,
        **(trainer_kwargs or {}),
    )


def snapshot(module, lora: bool | None = None):
    """A copy of `module`'s state; `lora=False`/`True` keeps only the base / only the LoRA tensors."""
    state = module.state_dict()
    return {k: v.clone() for k, v in state.items() if lora is None or ("lora_" in k) == lora}


def assert_same(before, after):
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def assert_all_changed(before, after):
    assert before.keys() == after.keys() and before
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_ddpo_trains_the_tokens_and_leaves_the_unet_bit_identical(tmp_path):
    ddpo_pipe = make_pipeline()
    tokens = ddpo_pipe.soft_tokens
    unet, text_encoder = snapshot(ddpo_pipe.unet), snapshot(ddpo_pipe.text_encoder)
    before = snapshot(tokens)
    seen = []
    trainer = ddpo(ddpo_pipe, tmp_path, hook=lambda samples, step, tracker: seen.append((step, tracker)))
    assert isinstance(trainer.trainable_layers, TrainableLayers)
    assert [id(p) for p in trainer.trainable_layers.parameters()] == [id(p) for p in tokens.parameters()]
    trainer.train()
    assert_all_changed(before, snapshot(tokens))
    assert_same(unet, snapshot(ddpo_pipe.unet))
    assert_same(text_encoder, snapshot(ddpo_pipe.text_encoder))
    # defect 5: without a tracker the image hook runs (each epoch) and gets None instead of an IndexError
    assert seen == [(0, None), (1, None)]


def test_ddpo_with_frozen_tokens_trains_only_the_lora(tmp_path):
    ddpo_pipe = make_pipeline(train_soft_tokens=False, use_lora=True)
    tokens, base, lora = (
        snapshot(ddpo_pipe.soft_tokens),
        snapshot(ddpo_pipe.unet, False),
        snapshot(ddpo_pipe.unet, True),
    )
    lora_b = {k: v for k, v in lora.items() if "lora_B" in k}  # lora_A starts random, lora_B at zero
    ddpo(ddpo_pipe, tmp_path).train()
    assert_same(tokens, snapshot(ddpo_pipe.soft_tokens))
    assert_same(base, snapshot(ddpo_pipe.unet, False))
    assert_all_changed(lora_b, {k: v for k, v in snapshot(ddpo_pipe.unet, True).items() if "lora_B" in k})


def test_nothing_to_train_raises_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        ddpo(make_pipeline(train_soft_tokens=False), tmp_path)
    with pytest.raises(ValueError, match="Nothing to train"):
        SoftTokenDDPOStableDiffusionPipeline.from_pipeline(tiny_pipeline("sd15"))


def test_pipeline_takes_a_loaded_pipeline_not_a_hub_id():
    with pytest.raises(TypeError, match="from_pretrained"):
        SoftTokenDDPOStableDiffusionPipeline.from_pipeline("runwayml/stable-diffusion-v1-5", use_lora=True)


def test_pipeline_uses_the_tokens_it_already_carries():
    pipe = tiny_pipeline("sd15")
    config = SoftTokensConfig.for_family("sd15", dim=pipe.unet.config.cross_attention_dim, init="normal")
    tokens = SoftTokens(config)
    attach_soft_tokens(pipe, tokens)
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="other soft tokens"):
        SoftTokenDDPOStableDiffusionPipeline.from_pipeline(pipe, soft_tokens=SoftTokens(config), use_lora=True)
    assert pipe.scheduler is scheduler and getattr(pipe.unet, "peft_config", None) is None  # left as it was
    assert SoftTokenDDPOStableDiffusionPipeline.from_pipeline(pipe).soft_tokens is tokens
    with pytest.raises(TypeError, match="SD1.x/2.x"):
        SoftTokenDDPOStableDiffusionPipeline.from_pipeline(tiny_pipeline("sdxl"), use_lora=True)


def test_no_accelerate_state_is_needed_first(tmp_path):
    ddpo_pipe = make_pipeline()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RuntimeError, match="accelerate state"):  # defect 1, as trl 0.23.1 ships
        DDPOTrainer(run_config(tmp_path), brightness, prompt_fn, ddpo_pipe)
    AcceleratorState._reset_state(reset_partial_state=True)
    SoftTokenDDPOStableDiffusionPipeline.from_pipeline(tiny_pipeline("sd15"), use_lora=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    ddpo(ddpo_pipe, tmp_path)


def test_alignprop_backpropagates_the_reward_into_the_tokens(tmp_path):
    ddpo_pipe = make_pipeline()
    tokens = ddpo_pipe.soft_tokens
    before, unet = snapshot(tokens), snapshot(ddpo_pipe.unet)
    grad_norms, seen = [], []
    tokens.tokens.register_post_accumulate_grad_hook(lambda p: grad_norms.append(float(p.grad.norm())))
    config = run_config(
        tmp_path, AlignPropConfig, sample_num_steps=3, truncated_backprop_rand=False, truncated_backprop_timestep=0
    )
    hook = lambda samples, step, tracker: seen.append((step, tracker))  # noqa: E731
    SoftAlignAlignPropTrainer(config, brightness, prompt_fn, ddpo_pipe, image_samples_hook=hook).train()
    assert len(grad_norms) == 2 and all(n > 0 for n in grad_norms)
    assert seen == [(1, None), (2, None)]
    assert_all_changed(before, snapshot(tokens))
    assert_same(unet, snapshot(ddpo_pipe.unet))


def test_half_precision_runs_keep_the_trained_tensors_in_float32(tmp_path):
    ddpo_pipe = make_pipeline(use_lora=True)
    tokens, lora = snapshot(ddpo_pipe.soft_tokens), snapshot(ddpo_pipe.unet, True)
    ddpo(ddpo_pipe, tmp_path, mixed_precision="bf16", num_epochs=1).train()  # the CPU's half precision
    assert ddpo_pipe.unet.conv_in.weight.dtype == torch.bfloat16  # trl casts the frozen UNet
    assert all(p.dtype == torch.float32 for p in ddpo_pipe.soft_tokens.parameters())
    assert all(p.dtype == torch.float32 for p in ddpo_pipe.lora_parameters().values())
    assert_all_changed(tokens, snapshot(ddpo_pipe.soft_tokens))
    assert not torch.equal(
        lora[next(k for k in lora if "lora_B" in k)],
        snapshot(ddpo_pipe.unet, True)[next(k for k in lora if "lora_B" in k)],
    )


def test_resuming_a_lora_run_restores_everything_and_keeps_training(tmp_path):
    first = make_pipeline(use_lora=True)
    trainer = ddpo(first, tmp_path, save_freq=1)  # trl saves after epoch 1 into checkpoints/checkpoint_0
    trainer.train()
    saved_tokens, saved_lora = snapshot(first.soft_tokens), snapshot(first.unet, True)
    saved_steps = trainer.optimizer.state_dict()["state"][0]["step"]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_0" / "soft_tokens").is_dir()

    second = make_pipeline(tokens_seed=2, use_lora=True)  # other initial tokens: the checkpoint must win
    assert not torch.equal(second.soft_tokens.tokens, saved_tokens["tokens"])
    resumed = ddpo(second, tmp_path, save_freq=1, num_epochs=3, resume_from=str(tmp_path / "run" / "checkpoints"))
    assert list(second.unet.peft_config) == ["default"]  # defect 3: no second adapter `default_1`
    assert_same(saved_tokens, snapshot(second.soft_tokens))
    assert_same(saved_lora, snapshot(second.unet, True))
    assert resumed.optimizer.state_dict()["state"][0]["step"] == saved_steps
    held = {id(p) for group in resumed.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in second.soft_tokens.parameters()} | {id(p) for p in second.lora_parameters().values()}

    # defect: trl 0.23.1 starts a resumed run at the checkpoint's number + 1 (epoch 1 again); checkpoint_0 was written
    # after epoch 1, so the run goes on with epoch 2
    assert resumed.first_epoch == 2
    resumed.train()  # epoch 2 only
    assert_all_changed(saved_tokens, snapshot(second.soft_tokens))
    lora_b = {k: v for k, v in saved_lora.items() if "lora_B" in k}
    assert_all_changed(lora_b, {k: v for k, v in snapshot(second.unet, True).items() if "lora_B" in k})
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_1").is_dir()
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint_2").exists()


def test_a_resume_that_cannot_restore_the_random_state_warns(tmp_path):
    trainer = ddpo(make_pipeline(), tmp_path, save_freq=1)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_0"
    for states in checkpoint.glob("random_states_*.pkl"):
        states.write_bytes(b"not a pickle")
    AcceleratorState._reset_state()
    with pytest.warns(UserWarning, match="Could not restore the random state"):
        resumed = ddpo(make_pipeline(), tmp_path, save_freq=1, num_epochs=3, resume_from=str(checkpoint))
    assert resumed.first_epoch == 2


def test_the_alongside_contract_trains_updates_the_ema_and_checkpoints_it(tmp_path):
    from shapes_data import shapes_pairs

    from softalign import SoftAlignConfig, SoftAlignTrainer

    ddpo_pipe = make_pipeline()
    align_args = SoftAlignConfig(output_dir=str(tmp_path / "align"), max_steps=1, resolution=32, save_steps=0)
    align = SoftAlignTrainer(ddpo_pipe.sd_pipeline, align_args, shapes_pairs(), soft_tokens=ddpo_pipe.soft_tokens)
    ema_before = align.trained.ema_tokens.tokens.detach().clone()
    trainer = ddpo(ddpo_pipe, tmp_path, save_freq=1, trainer_kwargs=dict(alongside=align, alongside_weight=0.5))
    trainer.train()
    assert trainer.last_alongside_loss is not None and trainer.alongside_step == 2  # one per optimizer step
    assert not torch.equal(align.trained.ema_tokens.tokens, ema_before)
    saved = tmp_path / "run" / "checkpoints" / "checkpoint_0"
    assert (saved / "alongside.safetensors").is_file() and (saved / "softalign_trl_state.json").is_file()
    with pytest.raises(ValueError, match="not both"):
        ddpo(make_pipeline(), tmp_path / "x", trainer_kwargs=dict(alongside=align, alongside_loss_fn=lambda: 0))


def test_checkpoint_without_the_trained_parts_is_refused(tmp_path):
    ddpo_pipe = make_pipeline(use_lora=True)
    with pytest.raises(FileNotFoundError, match="soft_tokens"):
        ddpo_pipe.load_checkpoint([object()], tmp_path)


def test_save_pretrained_writes_adapters_a_stock_pipeline_loads(tmp_path):
    ddpo_pipe = make_pipeline(use_lora=True)
    trainer = ddpo(ddpo_pipe, tmp_path, num_epochs=1)
    trainer.train()
    trainer.save_pretrained(tmp_path / "out")  # defect 2: AttributeError in trl 0.23.1
    trainer.save_model(tmp_path / "out_model")
    assert (tmp_path / "out_model" / "soft_tokens").is_dir() and (tmp_path / "out_model" / "unet_lora").is_dir()

    stock = tiny_pipeline("sd15")
    load_soft_tokens(stock, tmp_path / "out" / "soft_tokens")
    stock.unet.load_lora_adapter(tmp_path / "out" / "unet_lora", prefix=None, weight_name="adapter_model.safetensors")
    inputs = denoiser_inputs(stock, batch=1, text_len=7)
    with torch.no_grad():
        expected = ddpo_pipe.unet(**inputs).sample
        loaded = stock.unet(**inputs).sample
    torch.testing.assert_close(loaded, expected)


def train_one_epoch_with(tmp_path, name, **trainer_kwargs):
    """Tokens after one DDPO epoch (one optimizer step over 2 micro-steps) and their gradient before it."""
    ddpo_pipe = make_pipeline()
    tokens = ddpo_pipe.soft_tokens.tokens
    grads = []
    tokens.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
    if trainer_kwargs:
        trainer_kwargs["alongside_loss_fn"] = lambda: tokens.sum()  # reaches bank 1 too, which DDPO never uses
    ddpo(ddpo_pipe, tmp_path / name, num_epochs=1, trainer_kwargs=trainer_kwargs).train()
    assert len(grads) == 2  # accumulated over the 2 trained timesteps, then one optimizer step
    return tokens.detach().clone(), grads[-1]


def test_the_alongside_term_adds_its_gradient(tmp_path):
    initial = make_pipeline().soft_tokens.tokens.detach()
    plain, plain_grad = train_one_epoch_with(tmp_path, "plain")
    weight_zero, _ = train_one_epoch_with(tmp_path, "zero", alongside_weight=0.0)
    weighted, weighted_grad = train_one_epoch_with(tmp_path, "weighted", alongside_weight=0.5)
    micro, micro_grad = train_one_epoch_with(tmp_path, "micro", alongside_weight=0.5, alongside_every="micro_step")
    assert torch.equal(weight_zero, plain)
    assert torch.equal(plain[1], initial[1]) and torch.equal(plain_grad[1], torch.zeros_like(plain_grad[1]))
    # the optimizer step's gradient is DDPO's plus exactly weight * grad(tokens.sum()) = 0.5 everywhere
    torch.testing.assert_close(weighted_grad - plain_grad, torch.full_like(plain_grad, 0.5), atol=1e-6, rtol=0)
    assert not torch.equal(weighted[0], plain[0])
    torch.testing.assert_close(weighted[1], initial[1] - 3e-4, atol=1e-6, rtol=0)  # one Adam step of -lr
    # once per optimizer step (scaled by the accumulation) == at every micro-step, for a deterministic term
    torch.testing.assert_close(micro_grad, weighted_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(micro, weighted, atol=1e-7, rtol=0)


def test_alongside_loss_must_be_a_scalar(tmp_path):
    ddpo_pipe = make_pipeline()
    trainer = ddpo(
        ddpo_pipe, tmp_path, num_epochs=1, trainer_kwargs=dict(alongside_loss_fn=lambda: ddpo_pipe.soft_tokens.tokens)
    )
    with pytest.raises(ValueError, match="scalar"):
        trainer.train()
    with pytest.raises(ValueError, match="alongside_every"):
        ddpo(ddpo_pipe, tmp_path, trainer_kwargs=dict(alongside_every="epoch"))
