"""The FLUX.1 layout (MMDiT with rotary ids): slots reserved once at the transformer's input, written per block."""

import pytest
import torch
from helpers import ContextRecorder, denoiser_inputs, run_denoiser

from softalign import SoftTokens, SoftTokensConfig, attach_soft_tokens
from softalign.families import context_dim_of, latent_image_ids
from softalign.injection import rope_blocks
from softalign.testing import tiny_pipeline

N_TOKENS, TEXT_LEN = 4, 5


def strong_tokens(pipe, **overrides):
    config = SoftTokensConfig.for_family("flux", dim=context_dim_of(pipe), **overrides)
    soft_tokens = SoftTokens(config)
    with torch.no_grad():  # large values so their effect is unmistakable
        for p in soft_tokens.parameters():
            p.normal_(0, 1.0)
    return soft_tokens


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("position", ["append", "prepend"])
@pytest.mark.parametrize("blocks, n_layers", [("dual", 1), ("dual", 3), ("single", 2), ("all", 7)])
def test_each_block_sees_the_stream_with_its_own_tokens_in_the_reserved_slots(
    blocks, n_layers, position, checkpointing
):
    pipe = tiny_pipeline("flux")  # 6 double-stream and 2 single-stream blocks
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    soft_tokens = strong_tokens(pipe, n_layers=n_layers, position=position, blocks=blocks)
    inputs = denoiser_inputs(pipe, batch=2, text_len=TEXT_LEN, timestep=540)  # t / 1000 = 0.54: bucket 54
    every_block = rope_blocks(transformer, "all")
    chosen = rope_blocks(transformer, blocks)[:n_layers]
    embedded, outputs, ids = [], [], []
    handles = [
        transformer.context_embedder.register_forward_hook(lambda m, a, out: embedded.append(out.detach())),
        transformer.pos_embed.register_forward_pre_hook(lambda m, a: ids.append(a[0].clone())),
    ]
    for block in every_block:  # the context stream each block hands to the next
        handles.append(block.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach())))
    attach_soft_tokens(pipe, soft_tokens)
    recorder = ContextRecorder(every_block)
    if checkpointing:  # blocks are then called positionally, through torch.utils.checkpoint
        transformer.enable_gradient_checkpointing()
        transformer.train()
    run_denoiser(pipe, inputs)
    recorder.remove()
    for handle in handles:
        handle.remove()

    rows = slice(-N_TOKENS, None) if position == "append" else slice(0, N_TOKENS)
    zeros = torch.zeros(TEXT_LEN + N_TOKENS, 3)
    assert torch.equal(ids[0], torch.cat([zeros, latent_image_ids(4, 4)]))  # the slots' text ids are zero
    step_rows = soft_tokens.timestep_embedding.weight[54].chunk(n_layers)
    for index, (block, seen) in enumerate(zip(every_block, recorder.seen, strict=True)):
        expected = (embedded[0] if index == 0 else outputs[index - 1]).clone()
        assert seen.shape[1] == TEXT_LEN + N_TOKENS
        if any(block is c for c in chosen):
            layer = next(i for i, c in enumerate(chosen) if c is block)
            expected[:, rows] = (soft_tokens.tokens[0, layer] + step_rows[layer]).detach()
        assert torch.equal(seen, expected), index
    text_rows = slice(0, TEXT_LEN) if position == "append" else slice(N_TOKENS, None)
    assert torch.equal(recorder.seen[0][:, text_rows], embedded[0][:, text_rows])  # the text itself is untouched


def test_deprecated_3d_text_ids_get_their_slots_too():
    pipe = tiny_pipeline("flux")
    attach_soft_tokens(pipe, strong_tokens(pipe))
    inputs = denoiser_inputs(pipe, text_len=TEXT_LEN)
    with torch.no_grad():
        flat = run_denoiser(pipe, inputs)
        batched = run_denoiser(pipe, {**inputs, "txt_ids": inputs["txt_ids"][None], "img_ids": inputs["img_ids"][None]})
    assert torch.equal(flat, batched)


def test_too_many_layers_for_the_chosen_blocks_names_the_kind():
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="3 layers .* 2 blocks of kind 'single'"):
        attach_soft_tokens(pipe, strong_tokens(pipe, n_layers=3, blocks="single"))
    with pytest.raises(ValueError, match="blocks must be one of"):
        SoftTokensConfig.for_family("flux", dim=32, blocks="triple")
    with pytest.raises(ValueError, match="blocks is for architecture 'mmdit_rope' only"):
        SoftTokensConfig.for_family("sd3", dim=32, blocks="dual")
