import copy

import pytest
import torch
from shapes_data import shapes_pairs

from softalign import load_soft_tokens, save_soft_tokens
from softalign.families import denoiser_of
from softalign.softalign_config import SoftAlignConfig
from softalign.softalign_trainer import SoftAlignTrainer
from softalign.testing import tiny_pipeline
from softalign.training import list_checkpoints

PAIRS = shapes_pairs()


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), max_steps=3, logging_steps=1, resolution=32, save_steps=0)
    settings.update(overrides)
    return SoftAlignConfig(**settings)


def frozen_state(pipe):
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return [copy.deepcopy(m.state_dict()) for m in modules], modules


@pytest.mark.parametrize(
    "family, objective",
    [
        ("sd15", "agsm"),
        ("sdxl", "agsm"),
        ("sd3", "agsm"),
        ("sd15", "softrepa"),
        ("sd35", "agsm"),
        ("sd35", "softrepa"),
        ("flux", "agsm"),
        ("flux", "softrepa"),
    ],
)
def test_short_run_trains_every_token_and_nothing_else(family, objective, tmp_path):
    pipe = tiny_pipeline(family)
    before, modules = frozen_state(pipe)
    # the random tiny FLUX's errors are large enough that exp(-err / 0.07) gives gradients below AdamW's eps
    extra = {"softrepa_tau": 1.0} if (family, objective) == ("flux", "softrepa") else {}
    trainer = SoftAlignTrainer(pipe, config(tmp_path, objective=objective, **extra), PAIRS)
    initial = {k: v.clone() for k, v in trainer.soft_tokens.state_dict().items()}
    state = trainer.train()
    for name, value in trainer.soft_tokens.state_dict().items():
        assert (value != initial[name]).all(), name  # every element moved (AdamW decay reaches unused rows)
    for saved, module in zip(before, modules, strict=True):
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    assert state.global_step == 3 and len(state.log_history) == 3
    assert {"loss", "win_rate", "reward_margin", "lr"} <= set(state.log_history[-1])
    adapter = trainer.save_model()
    fresh = tiny_pipeline(family)
    loaded = load_soft_tokens(fresh, adapter)
    assert all(torch.equal(loaded.soft_tokens.state_dict()[k], v) for k, v in trainer.soft_tokens.state_dict().items())
    assert (tmp_path / "run" / "softalign_config.json").is_file()


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, logs):
        if logs["step"] == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("family", ["sd15", "sd35", "flux"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(family, tmp_path):
    # the flow families in fewer, smaller steps: their cost is the 512-row T5 context, not the resume logic
    steps, accumulation, batch = (5, 2, 4) if family == "sd15" else (3, 1, 2)
    settings = dict(
        max_steps=steps,
        save_steps=1,
        gradient_accumulation_steps=accumulation,
        train_batch_size=batch,
        negatives_per_positive=batch - 1,
        lr_scheduler="cosine",
    )
    whole = SoftAlignTrainer(tiny_pipeline(family), config(tmp_path / "a", **settings), PAIRS)
    whole.train()
    first = SoftAlignTrainer(tiny_pipeline(family), config(tmp_path / "b", **settings), PAIRS, callbacks=[StopAt(2)])
    first.train()
    assert first.state.global_step == 2
    second = SoftAlignTrainer(
        tiny_pipeline(family), config(tmp_path / "b", resume_from_checkpoint="latest", **settings), PAIRS
    )
    second.train()
    assert second.state.global_step == steps
    for name, value in whole.trained.state_dict().items():
        assert torch.equal(value, second.trained.state_dict()[name]), name  # online and EMA tokens
    assert [r["loss"] for r in whole.state.log_history] == [r["loss"] for r in second.state.log_history]
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == [
        f"checkpoint-{step}" for step in range(steps - 2, steps + 1)
    ]


def test_a_damaged_or_half_written_checkpoint_is_never_resumed(tmp_path):
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path, max_steps=2, save_steps=1), PAIRS)
    trainer.train()
    run = tmp_path / "run"
    (run / ".checkpoint-3.tmp-deadbeef").mkdir()  # a write interrupted before its rename
    weights = run / "checkpoint-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated after the fact
    counter = StopAt(-1)
    counter.calls = 0
    counter.on_step_end = lambda trainer, logs: setattr(counter, "calls", counter.calls + 1)
    resumed = SoftAlignTrainer(
        tiny_pipeline("sd15"),
        config(tmp_path, max_steps=2, resume_from_checkpoint="latest"),
        PAIRS,
        callbacks=[counter],
    )
    with pytest.warns(UserWarning, match="checkpoint-2 .*does not match its checksum"):
        resumed.train()
    assert counter.calls == 1  # resumed from checkpoint-1, then trained step 2 again
    assert [r["step"] for r in resumed.state.log_history] == [1, 2]
    weights.write_bytes(weights.read_bytes()[:-7])  # the resumed run rewrote checkpoint-2; damage it again
    with pytest.raises(ValueError, match="Refusing to resume from the damaged checkpoint"):
        SoftAlignTrainer(
            tiny_pipeline("sd15"), config(tmp_path, resume_from_checkpoint=str(run / "checkpoint-2")), PAIRS
        ).train()


def test_chunk_size_does_not_change_the_result(tmp_path):
    results = []
    for chunk in (1, 4):
        trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path / str(chunk), chunk_size=chunk), PAIRS)
        trainer.train()
        results.append(trainer.soft_tokens.state_dict())
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-7), name


def test_cache_is_reused_across_runs_and_invalidated_by_model_or_resolution(tmp_path):
    cache = str(tmp_path / "cache")

    def encode(pipe, **overrides):
        trainer = SoftAlignTrainer(pipe, config(tmp_path, cache_dir=cache, **overrides), PAIRS)
        return trainer.prepare_data().stats

    first = encode(tiny_pipeline("sd15"))
    assert (first.images_encoded, first.captions_encoded) == (16, 16)
    again = encode(tiny_pipeline("sd15"))
    assert (again.images_encoded, again.captions_encoded, again.images_reused) == (0, 0, 16)
    other_model = encode(tiny_pipeline("sd15", seed=1))  # a changed VAE / text encoder
    assert other_model.images_encoded == 16
    other_size = encode(tiny_pipeline("sd15"), resolution=16)
    assert other_size.images_encoded == 16


def test_bad_images_are_named_or_skipped_and_counted(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i, (image, caption) in enumerate(PAIRS[:8]):
        image.save(folder / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "{caption}"}}')
    (folder / "3.png").write_bytes(b"\x89PNG broken")
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"3\.png is not a readable image"):
        SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path), folder).prepare_data()
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path, skip_bad_images=True), folder)
    data = trainer.prepare_data()
    assert len(data) == 7 and data.stats.skipped == [str(folder / "3.png")]


def test_a_second_run_on_the_same_directory_refuses_to_start(tmp_path):
    from softalign.run_lock import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(RuntimeError, match="Another softalign run"):
            SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path), PAIRS).train()
    SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path, max_steps=1), PAIRS).train()  # free again


def test_nonfinite_loss_stops_or_skips(tmp_path):
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path), PAIRS)
    with torch.no_grad():
        trainer.soft_tokens.tokens.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="Non-finite loss"):
        trainer.train()
    skipping = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path / "s", on_nonfinite_loss="skip"), PAIRS)
    with torch.no_grad():
        skipping.soft_tokens.tokens.fill_(float("nan"))
    assert skipping.train().skipped_steps == 3


def test_lora_adapters_each_learn_only_from_their_own_pairs(tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline("sd15")
    lora = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])
    trainer = SoftAlignTrainer(pipe, config(tmp_path, max_steps=2), PAIRS, peft_config=lora)
    assert trainer.soft_tokens is None and trainer.trained.adapters == ["softalign_pos", "softalign_neg"]
    trainable = trainer.trained
    x = torch.randn(4, 4, 16, 16)
    context = torch.randn(4, 5, 32)

    def predict(index):
        return denoiser_of(pipe)(x[index], 10, encoder_hidden_states=context[index]).sample

    for bank, own, other in ((0, "softalign_pos", "softalign_neg"), (1, "softalign_neg", "softalign_pos")):
        trainable.denoiser.zero_grad(set_to_none=True)
        banks = torch.tensor([0, 1, 1, 0])
        out = trainable.forward(predict, banks)
        out[banks == bank].square().sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.lora_parameters(own))
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in trainable.lora_parameters(other))
    base = {k: v.clone() for k, v in denoiser_of(pipe).state_dict().items() if "lora" not in k}
    initial = {k: v.clone() for k, v in trainable.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainable.state_dict().items() if not torch.equal(v, initial[k])}
    assert {k for k in initial if ".softalign_pos." in k or ".softalign_neg." in k} <= changed
    assert all(torch.equal(v, denoiser_of(pipe).state_dict()[k]) for k, v in base.items())
    trainer.save_model()
    assert (tmp_path / "run" / "lora" / "softalign_pos" / "pytorch_lora_weights.safetensors").is_file()


def test_tokens_and_lora_train_together_and_chain_into_a_new_stage(tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline("sd15")
    stage1 = SoftAlignTrainer(pipe, config(tmp_path / "1"), PAIRS)
    stage1.train()
    tokens = stage1.soft_tokens
    after_stage1 = {k: v.clone() for k, v in tokens.state_dict().items()}
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    stage2 = SoftAlignTrainer(pipe, config(tmp_path / "2"), PAIRS, soft_tokens=tokens, peft_config=lora)
    stage2.train()
    assert stage2.soft_tokens is tokens
    assert all(not torch.equal(v, after_stage1[k]) for k, v in tokens.state_dict().items())
    save_soft_tokens(tokens, tmp_path / "tokens")


def test_tensorboard_logging_and_periodic_samples(tmp_path):
    trainer = SoftAlignTrainer(
        tiny_pipeline("sd15"),
        config(tmp_path, max_steps=2, report_to="tensorboard", sample_steps=2, sample_prompts=["a photo of a star"]),
        PAIRS,
    )
    trainer.train()
    run = tmp_path / "run"
    assert list(run.rglob("events.out.tfevents.*")), "no tensorboard event file"
    assert (run / "samples" / "step-000002.png").is_file()


def test_alignment_loss_is_a_differentiable_term_for_other_trainers(tmp_path):
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path), PAIRS)
    loss = trainer.alignment_loss(0)
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    grad = trainer.soft_tokens.tokens.grad.clone()
    trainer.soft_tokens.zero_grad(set_to_none=True)
    trainer._micro_step(0, 0, loss_scale=1.0)  # the same batch through the trainer's own backward
    assert torch.allclose(grad, trainer.soft_tokens.tokens.grad, rtol=1e-5, atol=1e-9)


def test_keep_groups_shuffles_whole_groups_and_refuses_broken_ones(tmp_path):
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path, train_batch_size=8, keep_groups=True), PAIRS)
    trainer.prepare_data()
    seen = []
    for step in range(4):  # two epochs of 16 examples
        indices = trainer._batch_indices(step, 0)
        groups = indices.view(-1, 4)
        assert torch.equal(groups % 4, torch.arange(4).expand_as(groups))  # each group whole and in dataset order
        assert torch.equal(groups // 4, (groups[:, :1] // 4).expand_as(groups))
        seen.append(groups[:, 0] // 4)
    assert sorted(torch.cat(seen[:2]).tolist()) == [0, 1, 2, 3]  # every group once per epoch
    assert torch.cat(seen[:2]).tolist() != [0, 1, 2, 3]  # ... in shuffled order (seed 42)
    plain = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path / "plain", train_batch_size=8), PAIRS)
    plain.prepare_data()
    assert any(
        not torch.equal(plain._batch_indices(s, 0).view(-1, 4) % 4, torch.arange(4).expand(2, 4)) for s in range(4)
    )
    with pytest.raises(ValueError, match="keep_groups needs every one of the dataset's groups of 4"):
        SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path / "odd", keep_groups=True), PAIRS[:14]).prepare_data()


def test_center_crop_help_says_what_preprocessing_does():
    """Defect: the help of center_crop=False spoke of a random crop; data.preprocess resizes to a square, no crop."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from softalign.data import preprocess

    field = {f.name: f for f in dataclasses.fields(SoftAlignConfig)}["center_crop"]
    text = field.metadata["help"]
    assert "random" not in text and "aspect ratio" in text and "no crop" in text
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1)))  # 64 x 32, a ramp
    squashed = preprocess(wide, 32, False, "ramp")
    assert squashed[0, 0, 0] < -0.9 and squashed[0, 0, -1] > 0.9  # the whole width kept: resized, not cropped


def test_shared_captions_warn_with_counts_and_negatives_come_from_differing_captions(tmp_path):
    """Defect: images sharing a caption were each other's negatives without a word (win rate exactly 0)."""
    images = [image for image, _ in PAIRS[:8]]
    one_caption = [(image, "a red square") for image in images]
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path / "one"), one_caption)
    with pytest.warns(UserWarning, match=r"7 of 8 examples repeat another example's caption \(1 distinct"):
        trainer.prepare_data()
    two_captions = [(image, "a red square" if i % 2 else "a blue circle") for i, image in enumerate(images)]
    args = config(tmp_path / "two", negatives_per_positive=1, train_batch_size=2, chunk_size=2)
    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), args, two_captions)
    with pytest.warns(UserWarning, match="drawn from captions that differ"):
        trainer.prepare_data()
    rows = trainer.data.caption_rows
    for step in range(12):  # three epochs of four micro-batches
        batch = trainer._batch_indices(step, 0)
        assert rows[batch[0]] != rows[batch[1]], step  # each image's negative has the other caption
    assert sorted(torch.cat([trainer._batch_indices(s, 0) for s in range(4)]).tolist()) == list(range(8))


def test_distinct_captions_keep_the_data_order():
    """Where every caption is distinct, negatives are drawn exactly as before (one permutation per epoch); where
    they repeat, each group holds distinct captions as long as the remaining examples allow it."""
    from softalign.data import distinct_caption_order

    order = torch.randperm(8)
    assert torch.equal(distinct_caption_order(order, torch.arange(8), 4), order)
    captions = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    arranged = distinct_caption_order(torch.arange(8), captions, 2)
    assert sorted(arranged.tolist()) == list(range(8))
    pairs = captions[arranged].reshape(-1, 2)
    assert all(a != b for a, b in pairs.tolist())


def test_deprecated_names_still_work_and_warn(tmp_path):
    from softalign.trainable import TrainableState, TrainedParameters

    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path), PAIRS)
    with pytest.warns(DeprecationWarning, match="batch_summary"):
        assert trainer.derived() == trainer.batch_summary()
    with pytest.warns(DeprecationWarning, match="trained"):
        assert trainer.trainable is trainer.trained
    assert isinstance(trainer.trained, TrainedParameters) and issubclass(TrainableState, TrainedParameters)
    with pytest.warns(DeprecationWarning, match="softalign.softalign_trainer"):
        import importlib
        import sys

        sys.modules.pop("softalign.trainer", None)
        old = importlib.import_module("softalign.trainer")
    assert old.SoftAlignTrainer is SoftAlignTrainer


class NotATensor:
    """A class `torch.load(weights_only=True)` refuses to unpickle."""


def test_resuming_from_a_refused_pickle_gives_softalign_s_message_not_torch_s(tmp_path):
    """Defect: a checkpoint pickle that weights_only refuses surfaced torch's UnpicklingError, whose text advises
    `weights_only=False`; every resume path reads through `read_training_files` and refuses in its own words."""
    from softalign.training import write_integrity

    trainer = SoftAlignTrainer(tiny_pipeline("sd15"), config(tmp_path, max_steps=1), PAIRS)
    trainer.train()
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    torch.save({"optimizer": NotATensor()}, checkpoint / "optimizer.pt")
    write_integrity(checkpoint)  # an intact record: the file is what its writer meant, just not loadable safely
    resumed = SoftAlignTrainer(
        tiny_pipeline("sd15"), config(tmp_path, max_steps=2, resume_from_checkpoint=str(checkpoint)), PAIRS
    )
    with pytest.raises(ValueError, match="Refused to resume") as raised:
        resumed.train()
    assert "weights_only=False" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@pytest.mark.parametrize("family, lora", [("sd15", False), ("flux", False), ("sd15", True), ("sd3", True)])
def test_gradient_checkpointing_gives_the_same_gradients(family, lora, tmp_path):
    """(Compared before AdamW: its normalised step turns float noise in near-zero gradients into lr-sized moves.)

    With a LoRA, AGSM routes psi+ and psi- rows through two PEFT adapters; a recomputation in the backward pass must
    use each row's own adapter, not the one active when backward runs."""
    from peft import LoraConfig

    grads, losses = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        pipe = tiny_pipeline(family)
        args = config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        peft = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_v"])
        trainer = SoftAlignTrainer(pipe, args, PAIRS, peft_config=peft if lora else None)
        assert denoiser_of(pipe).is_gradient_checkpointing == checkpointing
        trainer.prepare_data()
        losses.append(trainer._micro_step(0, 0)["loss"])
        trained = trainer.soft_tokens.named_parameters() if not lora else denoiser_of(pipe).named_parameters()
        grads.append({n: p.grad.clone() for n, p in trained if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name
