import copy

import pytest
import torch
from helpers import ContextRecorder, denoiser_inputs, run_denoiser, unet_cross_blocks

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens, injection_of
from softalign.families import context_dim_of, denoiser_of
from softalign.soft_tokens import timestep_buckets
from softalign.testing import tiny_pipeline


def tokens_for(pipe, **overrides):
    family = overrides.pop("family")
    config = SoftTokensConfig.for_family(family, dim=context_dim_of(pipe), init="normal", **overrides)
    soft_tokens = SoftTokens(config)
    with torch.no_grad():  # large values so their effect is unmistakable
        soft_tokens.tokens.normal_(0, 1.0)
        if soft_tokens.timestep_embedding is not None:
            soft_tokens.timestep_embedding.weight.normal_(0, 1.0)
    return soft_tokens


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_detached_is_bit_identical_and_attached_changes_the_output(family):
    pipe = tiny_pipeline(family)
    untouched = copy.deepcopy(denoiser_of(pipe))
    inputs = denoiser_inputs(pipe)
    with torch.no_grad():
        base = untouched(**inputs).sample
        injection = attach_soft_tokens(pipe, tokens_for(pipe, family=family))
        with_tokens = run_denoiser(pipe, inputs)
        injection.detach()
        after = run_denoiser(pipe, inputs)
    assert not torch.allclose(with_tokens, base)
    assert torch.equal(after, base)
    assert injection_of(pipe) is None
    assert len(denoiser_of(pipe)._forward_pre_hooks) == 0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("groups", [["down"], ["mid"], ["up"], ["down", "mid"], ["down", "mid", "up"]])
def test_unet_blocks_see_bos_then_tokens_then_text(family, groups):
    pipe = tiny_pipeline(family)
    unet = pipe.unet
    soft_tokens = tokens_for(pipe, family=family, unet_blocks=groups)
    inputs = denoiser_inputs(pipe, batch=2, timestep=537)
    context = inputs["encoder_hidden_states"]
    attach_soft_tokens(pipe, soft_tokens)
    blocks = unet_cross_blocks(unet)
    recorder = ContextRecorder([b for g in ("down", "mid", "up") for b in blocks[g]])
    with torch.no_grad():
        run_denoiser(pipe, inputs)
    recorder.remove()
    expected_tokens = soft_tokens.tokens[0] + soft_tokens.timestep_embedding.weight[53]  # bank 0 (psi+), t // 10
    injected = torch.cat([context[:, :1], expected_tokens.expand(2, -1, -1), context[:, 1:]], dim=1)
    seen = iter(recorder.seen)
    for group in ("down", "mid", "up"):
        for _ in blocks[group]:
            assert torch.equal(next(seen), injected if group in groups else context), group


@pytest.mark.parametrize("family", ["sd3", "sd35"])
@pytest.mark.parametrize("position", ["append", "prepend"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_mmdit_blocks_cut_the_context_back_to_the_text_then_add_their_layer_tokens(family, position, n_layers):
    pipe = tiny_pipeline(family, num_layers=4)
    transformer = pipe.transformer
    soft_tokens = tokens_for(pipe, family=family, n_layers=n_layers, position=position)
    inputs = denoiser_inputs(pipe, batch=2, text_len=5, timestep=1000.0)  # 1000 maps to bucket 99
    text_len = 5
    embedded, outputs = [], []
    handles = [transformer.context_embedder.register_forward_hook(lambda m, a, out: embedded.append(out.detach()))]
    for block in transformer.transformer_blocks:  # the context stream each block hands to the next
        handles.append(block.register_forward_hook(lambda m, a, out: outputs.append(out[0])))
    attach_soft_tokens(pipe, soft_tokens)
    recorder = ContextRecorder(list(transformer.transformer_blocks))
    with torch.no_grad():
        run_denoiser(pipe, inputs)
    recorder.remove()
    for handle in handles:
        handle.remove()
    step_rows = soft_tokens.timestep_embedding.weight[99].chunk(n_layers)
    for index, seen in enumerate(recorder.seen):
        previous = embedded[0] if index == 0 else outputs[index - 1]
        text = previous[:, :text_len] if position == "append" else previous[:, -text_len:]
        if index >= n_layers:
            assert torch.equal(seen, text), index
            continue
        layer_tokens = (soft_tokens.tokens[0, index] + step_rows[index]).expand(2, -1, -1)
        pieces = [text, layer_tokens] if position == "append" else [layer_tokens, text]
        assert torch.equal(seen, torch.cat(pieces, dim=1)), index
    assert recorder.seen[0].shape[1] == text_len + 4


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_bank_is_chosen_per_row(family):
    pipe = tiny_pipeline(family)
    soft_tokens = tokens_for(pipe, family=family)
    injection = attach_soft_tokens(pipe, soft_tokens)
    inputs = denoiser_inputs(pipe, batch=3)
    with torch.no_grad():
        with injection.use_banks(torch.tensor([0, 1, 0])):
            mixed = run_denoiser(pipe, inputs)
        with injection.use_banks(1):
            all_negative = run_denoiser(pipe, inputs)
        all_positive = run_denoiser(pipe, inputs)  # default: psi+ for every row
    assert torch.allclose(mixed[[0, 2]], all_positive[[0, 2]], atol=1e-6)
    assert torch.allclose(mixed[1], all_negative[1], atol=1e-6)
    assert not torch.allclose(all_positive[1], all_negative[1])
    with pytest.raises(ValueError, match="bank_ids has 2 entries, but the denoiser batch has 3 rows"):
        with injection.use_banks(torch.tensor([0, 1])):
            run_denoiser(pipe, inputs)


def test_timestep_bucket_changes_the_injected_tokens():
    pipe = tiny_pipeline("sd15")
    soft_tokens = tokens_for(pipe, family="sd15")
    attach_soft_tokens(pipe, soft_tokens)
    recorder = ContextRecorder([pipe.unet.down_blocks[0]])
    outputs = {}
    with torch.no_grad():
        for t in (530, 539, 540):
            run_denoiser(pipe, denoiser_inputs(pipe, timestep=t))
            outputs[t] = recorder.seen[0][:, 1:5].clone()
    recorder.remove()
    assert torch.equal(outputs[530], outputs[539])  # same bucket 53
    assert not torch.equal(outputs[539], outputs[540])  # bucket 54
    assert timestep_buckets(torch.tensor([540])).item() == 54


def test_disabled_injection_passes_through_and_double_attach_is_refused():
    pipe = tiny_pipeline("sd15")
    inputs = denoiser_inputs(pipe)
    with torch.no_grad():
        base = run_denoiser(pipe, inputs)
        injection = attach_soft_tokens(pipe, tokens_for(pipe, family="sd15"))
        with injection.disabled():
            assert torch.equal(run_denoiser(pipe, inputs), base)
        assert not torch.equal(run_denoiser(pipe, inputs), base)
    with pytest.raises(ValueError, match="already carries soft tokens"):
        attach_soft_tokens(pipe, tokens_for(pipe, family="sd15"))


def _train_step(pipe, soft_tokens, inputs):
    denoiser = denoiser_of(pipe)
    soft_tokens.zero_grad(set_to_none=True)
    out = denoiser(**inputs).sample
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in soft_tokens.named_parameters()}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_gradient_reaches_the_tokens_only_and_survives_gradient_checkpointing(family):
    pipe = tiny_pipeline(family)
    denoiser = denoiser_of(pipe)
    denoiser.requires_grad_(False)
    soft_tokens = tokens_for(pipe, family=family)
    attach_soft_tokens(pipe, soft_tokens)
    inputs = denoiser_inputs(pipe)
    plain = _train_step(pipe, soft_tokens, inputs)
    assert all(g.abs().sum() > 0 for g in plain.values())
    assert all(p.grad is None for p in denoiser.parameters())
    denoiser.enable_gradient_checkpointing()
    denoiser.train()
    checkpointed = _train_step(pipe, soft_tokens, inputs)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("family", ["sd15", "sd3", "sd35", "flux"])
def test_soft_tokens_work_beside_a_peft_lora_on_the_same_denoiser(family):
    from peft import LoraConfig

    pipe = tiny_pipeline(family)
    denoiser = denoiser_of(pipe)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    )
    soft_tokens = tokens_for(pipe, family=family)
    inputs = denoiser_inputs(pipe)
    with torch.no_grad():
        lora_only = run_denoiser(pipe, inputs)
    injection = attach_soft_tokens(pipe, soft_tokens)
    grads = _train_step(pipe, soft_tokens, inputs)
    assert all(g.abs().sum() > 0 for g in grads.values())
    lora = {n: p.grad for n, p in denoiser.named_parameters() if "lora" in n}
    assert lora and all(g is not None for g in lora.values())
    assert all(g.abs().sum() > 0 for n, g in lora.items() if "lora_B" in n)  # lora_A starts behind a zero B
    injection.detach()
    with torch.no_grad():
        assert torch.equal(run_denoiser(pipe, inputs), lora_only)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "flux"])
def test_stock_pipeline_call_generates_with_the_tokens(family):
    pipe = tiny_pipeline(family)
    call = dict(prompt="a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    injection = attach_soft_tokens(pipe, tokens_for(pipe, family=family))
    tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    injection.detach()
    again = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert not (tuned == base).all()
    assert (again == base).all()


def test_wrong_family_and_wrong_width_name_both_shapes():
    sd3 = tiny_pipeline("sd3")
    unet_tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=32))
    with pytest.raises(ValueError, match=r"unet denoiser .*\(2, 4, 32\).*SD3Transformer2DModel"):
        attach_soft_tokens(sd3, unet_tokens)
    wide = tiny_pipeline("sd15", cross_attention_dim=64)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 32\).*width is 64.*\(2, 4, 64\)"):
        attach_soft_tokens(wide, unet_tokens)
    deep = SoftTokens(SoftTokensConfig.for_family("sd3", dim=32, n_layers=7))
    with pytest.raises(ValueError, match="7 layers .* 6 blocks"):
        attach_soft_tokens(sd3, deep)


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_checkpointed_blocks_recompute_with_the_banks_of_their_forward(family):
    """MMDiT blocks are checkpointed whole, so the injection runs again in backward, after `use_banks` has exited:
    it must inject what the forward injected (psi- rows stay psi-), not the banks in use at backward time."""
    grads = []
    for checkpointing in (False, True):
        pipe = tiny_pipeline(family)
        denoiser = denoiser_of(pipe).requires_grad_(False)
        soft_tokens = tokens_for(pipe, family=family)
        injection = attach_soft_tokens(pipe, soft_tokens)
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        with injection.use_banks(torch.tensor([0, 1])):
            out = run_denoiser(pipe, denoiser_inputs(pipe))
        out.square().mean().backward()  # outside use_banks, as the trainers' chunked backward is
        grads.append(soft_tokens.tokens.grad.clone())
    assert grads[0][1].abs().sum() > 0  # psi- has a gradient
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
