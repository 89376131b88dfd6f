"""Every family at its released widths (random weights, 1-2 blocks): official-size tokens land where the layout says,
and one SoftAlign step's trainable-state memory is what docs/big_models.md's formula predicts (slow: large widths)."""

import pytest
from helpers import ContextRecorder
from shapes_data import shapes_pairs

from softalign import SoftAlignConfig, SoftAlignTrainer, SoftTokens
from softalign.families import denoiser_of
from softalign.injection import rope_blocks
from softalign.testing import tiny_pipeline

pytestmark = pytest.mark.slow

# family -> (tiny_pipeline overrides at the released widths, official AGSM token shape, parameter count of the tokens)
REAL = {
    "sd15": (dict(cross_attention_dim=768, sample_size=8), (2, 4, 768), 2 * 4 * 768 + 100 * 768),
    "sdxl": (dict(cross_attention_dim=2048, sample_size=8), (2, 4, 2048), 2 * 4 * 2048 + 100 * 2048),
    "sd3": (
        dict(caption_projection_dim=1536, attention_head_dim=64, num_layers=5, joint_attention_dim=4096),
        (2, 5, 4, 1536),
        2 * 5 * 4 * 1536 + 100 * 5 * 1536,
    ),
    "sd35": (
        dict(caption_projection_dim=1536, attention_head_dim=64, num_layers=5, joint_attention_dim=4096),
        (2, 5, 4, 1536),
        2 * 5 * 4 * 1536 + 100 * 5 * 1536,
    ),
    "flux": (
        dict(num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096, num_layers=1,
             num_single_layers=1, pooled_projection_dim=768),
        (2, 1, 4, 3072),
        2 * 1 * 4 * 3072 + 100 * 1 * 3072,
    ),
}  # fmt: skip
BYTES_PER_TRAINED_PARAMETER = 4 * 5  # float32: the value, its gradient, AdamW's two moments, and AGSM's EMA copy


@pytest.mark.parametrize("family", sorted(REAL))
def test_official_size_tokens_land_in_the_layout_and_the_step_costs_what_the_formula_says(family, tmp_path):
    overrides, shape, count = REAL[family]
    pipe = tiny_pipeline(family, **overrides)
    n_layers = shape[1] if len(shape) == 4 else None
    tokens = SoftTokens.for_pipeline(pipe, objective="agsm", **({"n_layers": n_layers} if n_layers else {}))
    assert tuple(tokens.tokens.shape) == shape and sum(p.numel() for p in tokens.parameters()) == count
    args = SoftAlignConfig(
        output_dir=str(tmp_path), max_steps=1, resolution=32, save_steps=0, train_batch_size=2, negatives_per_positive=1
    )
    trainer = SoftAlignTrainer(pipe, args, shapes_pairs(4), soft_tokens=tokens)
    denoiser = denoiser_of(pipe)
    if family == "flux":
        blocks = rope_blocks(denoiser, "all")
    elif family.startswith("sd3"):
        blocks = list(denoiser.transformer_blocks)
    else:
        blocks = [b for b in denoiser.down_blocks if getattr(b, "has_cross_attention", False)]
    recorder = ContextRecorder(blocks)
    trainer.train()
    recorder.remove()
    width = shape[-1]
    for seen in recorder.seen:
        assert seen.shape[-1] == width
    text = trainer.data.conditioning["prompt_embeds"].shape[1]
    assert recorder.seen[0].shape[1] == text + 4  # 4 official tokens, after BOS, appended, or in the reserved slots
    # trainable state after one step: exactly the formula's bytes (nothing else is trained or kept per parameter)
    optimizer_state = sum(
        t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values() if t.dim() > 0
    )
    params = list(trainer.trained.parameters())
    values = sum(p.numel() * p.element_size() for p in params)
    grads = values  # set to None after the step; during the backward they are one float32 per value
    ema = sum(t.numel() * t.element_size() for t in trainer.trained.ema_tokens.state_dict().values())
    assert all(p.grad is None for p in params)
    assert values + grads + optimizer_state + ema == BYTES_PER_TRAINED_PARAMETER * count
