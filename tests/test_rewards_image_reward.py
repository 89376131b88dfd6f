"""ImageReward on transformers' BLIP: checkpoint renaming, its formula, the reward contract, gradients, errors."""

from __future__ import annotations

import json

import pytest
import torch

from softalign.rewards import AestheticHead, ImageReward, convert_image_reward_checkpoint, image_reward_to_transformers
from softalign.rewards.clip_core import pil_pixels
from softalign.rewards.image_reward import CLIP_MEAN, CLIP_STD, MEAN, STD
from softalign.testing.models import tiny_blip

PROMPTS = ["a photo of a cat", "two dogs in a park"]


def to_image_reward(model, head) -> dict:
    """The inverse renaming, written independently: transformers' BLIP -> ImageReward.pt's keys."""
    out = {}
    vision = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    layer = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
    }
    for key, value in model.state_dict().items():
        if key.startswith("vision_model."):
            rest = key.removeprefix("vision_model.")
            if rest in vision:
                out["blip.visual_encoder." + vision[rest]] = value
            else:
                _, _, index, *tail = rest.split(".")  # encoder.layers.N.<module>.<param>
                module, param = ".".join(tail[:-1]), tail[-1]
                out[f"blip.visual_encoder.blocks.{index}.{layer.get(module, module)}.{param}"] = value
        elif key.startswith("text_encoder."):
            out["blip." + key] = value
        else:
            out["blip." + key] = value  # projections and ITM head: present in BLIP, unused by ImageReward
    out.update({"mlp." + k: v for k, v in head.state_dict().items()})
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    base, _ = tiny_blip(root / "base")
    trained, tokenizer = tiny_blip(seed=3)
    torch.manual_seed(1)
    head = AestheticHead(dim=32)
    torch.save({"module." + k: v for k, v in to_image_reward(trained, head).items()}, root / "ImageReward.pt")
    out = convert_image_reward_checkpoint(root / "ImageReward.pt", root / "base", root / "converted")
    return out, trained, tokenizer, head


def test_the_converted_model_scores_as_imagereward(converted):
    out, trained, tokenizer, head = converted
    scorer = ImageReward.from_pretrained(out)
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    rewards, info = scorer(images, PROMPTS, [{}, {}])
    assert rewards.dtype == torch.float32 and rewards.shape == (2,) and info == {}
    # ImageReward's score by hand on the unconverted model: [CLS] state of the cross-encoder, MLP, normalised
    from softalign.rewards.clip_core import tensor_pixels

    with torch.no_grad():
        image_tokens = trained.vision_model(
            pixel_values=tensor_pixels(images, 32, CLIP_MEAN, CLIP_STD)
        ).last_hidden_state
        ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        text = trained.text_encoder(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
        want = (head(text) - MEAN) / STD
    assert torch.allclose(rewards, want, atol=1e-5)
    assert ids["input_ids"][0, 0] == tokenizer.cls_token_id  # [CLS] first, as ImageReward's score
    # the metric path: PIL, exact transform
    from softalign.rewards import to_pil_images

    pil = to_pil_images(images)
    assert pil_pixels(pil, 32, CLIP_MEAN, CLIP_STD).shape == (2, 3, 32, 32)
    assert len(scorer.metric(pil, PROMPTS)) == 2
    # differentiable in the images
    images.requires_grad_(True)
    scorer.score(images, PROMPTS).sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    settings = json.loads((out / "image_reward.json").read_text())
    assert settings["mean"] == MEAN and settings["std"] == STD and settings["max_length"] == 35


def test_bad_image_reward_inputs(converted, tmp_path):
    out, *_ = converted
    with pytest.raises(ValueError, match="not an ImageReward state dict"):
        image_reward_to_transformers({"visual.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not part of BLIP's ViT"):
        image_reward_to_transformers(
            {"blip.visual_encoder.head.weight": torch.zeros(1), "mlp.layers.0.weight": torch.zeros(1)}
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_image_reward_checkpoint(tmp_path / "missing.pt", out, tmp_path / "x")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "image_reward_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="image_reward_head.safetensors is missing"):
        ImageReward.from_pretrained(broken)


def test_ddpo_trains_one_epoch_on_image_reward(converted, tmp_path):
    from rl_fixtures import tiny_ddpo_config, tokens_for

    from softalign.rl.ddpo_trainer import DDPOTrainer
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    tokens = tokens_for(pipe, "sd15")
    before = [p.detach().clone() for p in tokens.parameters()]
    config = tiny_ddpo_config(str(tmp_path / "ddpo"), num_epochs=1, sample_num_steps=2, sample_num_batches_per_epoch=1)
    DDPOTrainer(
        config, ImageReward.from_pretrained(converted[0]), lambda: (PROMPTS[0], {}), pipe, soft_tokens=tokens
    ).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tokens.parameters(), strict=True))
