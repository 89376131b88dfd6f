"""The UNet hooks build one denoiser call's soft tokens once and share them across the hooked blocks: the same output
as building them per block, bit for bit, and the same gradients up to summation order."""

import pytest
import torch
from helpers import denoiser_inputs, run_denoiser, unet_cross_blocks

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
from softalign.families import context_dim_of, denoiser_of
from softalign.injection import SoftTokenInjection
from softalign.testing import tiny_pipeline


def attached(family: str, **config):
    pipe = tiny_pipeline(family)
    denoiser_of(pipe).requires_grad_(False)
    soft_tokens = SoftTokens(SoftTokensConfig.for_family(family, dim=context_dim_of(pipe), init="normal", **config))
    with torch.no_grad():  # a timestep part large enough to matter
        soft_tokens.timestep_embedding.weight.normal_(0, 1.0)
    return pipe, soft_tokens, attach_soft_tokens(pipe, soft_tokens)


def n_hooked(pipe) -> int:
    return sum(len(blocks) for blocks in unet_cross_blocks(denoiser_of(pipe)).values())


def count_builds(soft_tokens) -> list:
    calls = []
    soft_tokens.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tokens_are_built_once_per_denoiser_call(family):
    pipe, soft_tokens, injection = attached(family, unet_blocks=["down", "mid", "up"])
    assert n_hooked(pipe) >= 3
    calls = count_builds(soft_tokens)
    with torch.no_grad():
        run_denoiser(pipe, denoiser_inputs(pipe))
        run_denoiser(pipe, denoiser_inputs(pipe, batch=3))
    assert calls == [2, 3]  # one build per call, for that call's batch
    assert injection._call_tokens is None  # forgotten once the call returns


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shared_tokens_give_the_per_block_output_bit_for_bit_and_its_gradients(family, monkeypatch):
    pipe, soft_tokens, injection = attached(family, unet_blocks=["down", "mid", "up"])
    inputs = denoiser_inputs(pipe, batch=4)
    inputs["timestep"] = torch.tensor([10, 400, 700, 990])
    banks = torch.tensor([0, 1, 1, 0])

    def run():
        soft_tokens.zero_grad(set_to_none=True)
        with injection.use_banks(banks):
            out = run_denoiser(pipe, inputs)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in soft_tokens.named_parameters()}

    shared, shared_grads = run()
    # the former behaviour: no call-level tokens, every block builds its own
    monkeypatch.setattr(
        SoftTokenInjection, "_call_tokens", property(lambda self: None, lambda self, value: None), raising=False
    )
    calls = count_builds(soft_tokens)
    per_block, per_block_grads = run()
    assert len(calls) == n_hooked(pipe) + 1  # really per block (plus the call-level build the patch discards)
    assert torch.equal(shared, per_block)
    for name in shared_grads:  # the same terms, summed in another order (before the lookup, not after): rounding only
        torch.testing.assert_close(shared_grads[name], per_block_grads[name], rtol=1e-6, atol=1e-9)
        assert shared_grads[name].abs().sum() > 0


def test_a_disabled_injection_builds_no_tokens_and_detach_removes_every_hook():
    pipe, soft_tokens, injection = attached("sd15")
    calls = count_builds(soft_tokens)
    with torch.no_grad(), injection.disabled():
        run_denoiser(pipe, denoiser_inputs(pipe))
    assert calls == []
    injection.detach()
    assert not denoiser_of(pipe)._forward_pre_hooks and not denoiser_of(pipe)._forward_hooks
