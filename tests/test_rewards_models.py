"""Reward / metric models: formulas on hand-made embeddings, the reward contract, gradients to soft tokens, DDPO."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from softalign import SoftTokens, SoftTokensConfig
from softalign.backbones import context_dim_of
from softalign.injection import attach_soft_tokens
from softalign.rewards import (
    AestheticHead,
    AestheticScore,
    CLIPCore,
    CLIPScore,
    HPSv2,
    PickScore,
    aesthetic_score,
    as_reward_fn,
    clip_score,
    convert_open_clip_checkpoint,
    hps_score,
    open_clip_to_transformers,
    pick_score,
)
from softalign.testing import tiny_pipeline
from softalign.testing.models import tiny_clip

PROMPTS = ["a photo of a cat", "a photo of two dogs"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    tiny_clip(path)
    return path


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(AestheticHead(dim=16).state_dict(), path)
    return path


def images(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- formulas on hand-made embeddings ------------------------------------------------------------------------------


def test_formulas_on_hand_made_embeddings():
    v = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    t = torch.tensor([[8.0, 6.0], [-4.0, -3.0]])  # cos 0.96 and -0.96
    assert clip_score(v, t).tolist() == pytest.approx([96.0, 0.0])  # max(100 cos, 0)
    assert clip_score(v, t, scale=2.5).tolist() == pytest.approx([2.4, 0.0])  # the paper's w = 2.5
    assert pick_score(v, t, torch.tensor(math.log(100.0))).tolist() == pytest.approx([96.0, -96.0], rel=1e-5)
    assert hps_score(v, t).tolist() == pytest.approx([0.96, -0.96])
    linear = AestheticHead(dim=2, linear=True)
    linear.layers[0].weight.data = torch.tensor([[10.0, 5.0]])
    linear.layers[0].bias.data = torch.tensor([1.0])
    assert aesthetic_score(v, linear).tolist() == pytest.approx([1 + 10 * 0.6 + 5 * 0.8] * 2)  # head(v / |v|)
    mlp = AestheticHead(dim=2)
    x = torch.tensor([[0.6, 0.8]])
    for index in (0, 2, 4, 6, 7):  # no activations between the layers: a product of affine maps
        layer = mlp.layers[index]
        x = x @ layer.weight.T + layer.bias
    assert aesthetic_score(v[:1], mlp).item() == pytest.approx(x.item(), rel=1e-5)


def test_aesthetic_head_files(tmp_path, head_file):
    assert isinstance(AestheticHead.from_file(head_file), AestheticHead)
    torch.save({"weight": torch.ones(1, 16), "bias": torch.zeros(1)}, tmp_path / "v1.pth")
    assert AestheticHead.from_file(tmp_path / "v1.pth").layers[0].in_features == 16
    torch.save({"fc.weight": torch.ones(1, 16)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an aesthetic head"):
        AestheticHead.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1"):
        AestheticHead.from_file(tmp_path / "missing.pth")


# --- the scorers on a tiny CLIP --------------------------------------------------------------------------------------


def test_scorers_follow_their_formulas_and_the_reward_contract(clip_dir, head_file):
    clip, pick, hps = (cls.from_pretrained(clip_dir) for cls in (CLIPScore, PickScore, HPSv2))
    aesthetic = AestheticScore.from_pretrained(clip_dir, head_file)
    assert clip.core is pick.core is hps.core is aesthetic.core is CLIPCore.from_pretrained(clip_dir)  # loaded once
    batch = images()
    core = clip.core
    with torch.no_grad():
        v = core.image_embeds(core.tensor_pixels(batch))
        t = core.text_embeds(PROMPTS)
    expected = {
        clip: clip_score(v, t),
        pick: pick_score(v, t, core.model.logit_scale.float()),
        hps: hps_score(v, t),
        aesthetic: aesthetic_score(v, aesthetic.head),
    }
    for scorer, want in expected.items():
        rewards, info = scorer(batch, PROMPTS, [{}, {}])  # DDPO / TRL reward_fn
        assert rewards.dtype == torch.float32 and rewards.shape == (2,) and not rewards.requires_grad
        assert isinstance(info, dict)
        assert torch.allclose(rewards, want, atol=1e-5)
        pil = [Image.fromarray((b.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for b in batch]
        metric = scorer.metric(pil, PROMPTS)
        assert len(metric) == 2 and all(math.isfinite(m) for m in metric)
        assert scorer.metric(pil, PROMPTS, batch_size=1) == pytest.approx(metric, abs=1e-5)  # batching is neutral
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip(batch, PROMPTS + ["x"])
    with pytest.raises(ValueError, match="takes 768-d"):
        AestheticScore(core, AestheticHead())


def test_a_gradient_reaches_the_soft_tokens_through_each_scorer(clip_dir, head_file):
    pipe = tiny_pipeline("sd15")
    tokens = SoftTokens(SoftTokensConfig.for_family("sd15", dim=context_dim_of(pipe), init="normal"))
    attach_soft_tokens(pipe, tokens)
    scorers = [cls.from_pretrained(clip_dir) for cls in (PickScore, HPSv2)]
    scorers.append(AestheticScore.from_pretrained(clip_dir, head_file))
    # CLIPScore is max(100 cos, 0), flat where cos < 0, which is where a random tiny CLIP puts every pair; a negative
    # scale keeps the same path (CLIP tower, clamp) on the sloped side.
    scorers.append(CLIPScore(scorers[0].core, scale=-100.0))
    with torch.no_grad():
        embeds = pipe.text_encoder(pipe.tokenizer(PROMPTS, padding="max_length", return_tensors="pt").input_ids)[0]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=generator)
    timestep = torch.tensor([500, 500])

    def generate():
        noise = pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample
        decoded = pipe.vae.decode((latents - noise) / pipe.vae.config.scaling_factor).sample
        return (decoded / 2 + 0.5).clamp(0, 1)  # (2, 3, H, W) in [0, 1], as the trainers decode

    image = generate()
    total = 0
    for scorer in scorers:  # each scorer's score has a slope in the image ...
        score = scorer.score(image, PROMPTS).sum()
        (grad,) = torch.autograd.grad(score, image, retain_graph=True)
        assert float(grad.abs().sum()) > 0, scorer.name
        total = total + score
    total.backward()  # ... and the image one in the soft tokens
    grads = [p.grad for p in tokens.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_ddpo_trains_one_epoch_on_each_scorer(clip_dir, head_file, tmp_path):
    from rl_fixtures import tiny_ddpo_config, tokens_for

    from softalign.rl.ddpo_trainer import DDPOTrainer

    scorers = [cls.from_pretrained(clip_dir) for cls in (CLIPScore, PickScore, HPSv2)]
    scorers.append(AestheticScore.from_pretrained(clip_dir, head_file))
    for scorer in scorers:
        pipe = tiny_pipeline("sd15")
        tokens = tokens_for(pipe, "sd15")
        before = [p.detach().clone() for p in tokens.parameters()]
        config = tiny_ddpo_config(
            str(tmp_path / scorer.name), num_epochs=1, sample_num_steps=2, sample_num_batches_per_epoch=1
        )
        DDPOTrainer(config, scorer, lambda: (PROMPTS[0], {}), pipe, soft_tokens=tokens).train()
        assert any(not torch.equal(a, b) for a, b in zip(before, tokens.parameters(), strict=True)), scorer.name


# --- the plug-in contract for users' rewards -------------------------------------------------------------------------


def test_point_wise_reward_with_declared_pil_inputs():
    seen = []

    def redness(pil_images, prompts, metadata):
        seen.append(type(pil_images[0]))
        return [np.asarray(im)[..., 0].mean() / 255 for im in pil_images]

    reward_fn = as_reward_fn(redness, inputs="pil")
    batch = images()
    rewards, info = reward_fn(batch, PROMPTS, [{}, {}])
    assert seen == [Image.Image] and rewards.dtype == torch.float32 and info == {}
    assert rewards.tolist() == pytest.approx(batch[:, 0].mean(dim=(1, 2)).tolist(), abs=3e-3)
    with pytest.raises(ValueError, match="returned 1 scores for 2 images"):
        as_reward_fn(lambda i, p, m: [0.0], name="short")(batch, PROMPTS, [{}, {}])
    with pytest.raises(ValueError, match="non-finite"):
        as_reward_fn(lambda i, p, m: [0.0, float("inf")])(batch, PROMPTS, [{}, {}])
    with pytest.raises(ValueError, match="inputs must be one of"):
        as_reward_fn(redness, inputs="numpy")


def test_group_wise_reward_scores_each_prompt_together_in_batch_order():
    calls = []

    def rank_in_group(group, prompt, metadata):  # the brightest image of each prompt gets 1
        calls.append((prompt, len(group), [m["i"] for m in metadata]))
        brightness = group.mean(dim=(1, 2, 3))
        return brightness.argsort().argsort().float() / max(len(group) - 1, 1)

    reward_fn = as_reward_fn(rank_in_group, group_wise=True)
    batch = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.9, 0.5, 0.2, 0.7)])
    prompts = ["a", "b", "a", "b", "a"]
    rewards, info = reward_fn(batch, prompts, [{"i": i} for i in range(5)])
    assert calls == [("a", 3, [0, 2, 4]), ("b", 2, [1, 3])]
    assert rewards.tolist() == [0.0, 1.0, 0.5, 0.0, 1.0] and info == {"groups": 2}
    with pytest.raises(ValueError, match="prompt 'a'"):
        as_reward_fn(lambda g, p, m: torch.zeros(1), group_wise=True)(batch, prompts, [{}] * 5)


# --- HPS: open_clip checkpoints into CLIPModel -----------------------------------------------------------------------


def to_open_clip(model) -> dict:
    """The inverse renaming, written independently: transformers' CLIPModel -> open_clip's keys."""
    state, out = model.state_dict(), {}
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        layers = (
            model.config.text_config.num_hidden_layers
            if tower == "text_model"
            else model.config.vision_config.num_hidden_layers
        )
        for i in range(layers):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                    [state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
                )
                out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
                out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
                out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
                out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
                out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"], out["ln_final.bias"] = (
        state["text_model.final_layer_norm.weight"],
        state["text_model.final_layer_norm.bias"],
    )
    out["text_projection"] = state["text_projection.weight"].T
    out["visual.proj"] = state["visual_projection.weight"].T
    out["visual.class_embedding"] = state["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = state["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = state["vision_model.embeddings.patch_embedding.weight"]
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"visual.{theirs}.{kind}"] = state[f"vision_model.{ours}.{kind}"]
    out["logit_scale"] = state["logit_scale"]
    out["attn_mask"] = torch.zeros(77, 77)
    return out


def test_open_clip_checkpoint_converts_to_the_same_clip(clip_dir, tmp_path):
    trained, _ = tiny_clip(seed=7)  # "HPS": the same architecture, other weights
    torch.save({"state_dict": {"module." + k: v for k, v in to_open_clip(trained).items()}}, tmp_path / "hps.pt")
    out = convert_open_clip_checkpoint(tmp_path / "hps.pt", clip_dir, tmp_path / "hps")
    converted = HPSv2.from_pretrained(out)
    reference = HPSv2(CLIPCore(trained, converted.core.tokenizer, 32, converted.core.mean, converted.core.std))
    batch = images()
    assert torch.allclose(converted(batch, PROMPTS)[0], reference(batch, PROMPTS)[0], atol=1e-6)
    assert os.path.isfile(out / "preprocessor_config.json") and os.path.isfile(out / "tokenizer.json")
    with pytest.raises(ValueError, match="not part of a ViT CLIP"):
        open_clip_to_transformers({"text.transformer.wte.weight": torch.zeros(1)})
    torch.save({"token_embedding.weight": torch.zeros(3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="does not fit"):
        convert_open_clip_checkpoint(tmp_path / "partial.pt", clip_dir, tmp_path / "partial")


@pytest.mark.slow
def test_real_clip_prefers_the_matching_caption():
    path, image_path = os.environ.get("SOFTALIGN_CLIP"), os.environ.get("SOFTALIGN_CLIP_IMAGE")
    if not path or not image_path:
        pytest.skip("set SOFTALIGN_CLIP (a local clip-vit-large-patch14) and SOFTALIGN_CLIP_IMAGE (a photo of a cat)")
    scorer = CLIPScore.from_pretrained(path)
    image = Image.open(image_path)
    match, other = scorer.metric([image, image], ["a photo of a cat", "a photo of a truck"])
    assert match > other
