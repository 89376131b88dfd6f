"""scripts/context_spread.py: how much of a count word is left in the denoiser's text context."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_spread_by_hand():
    from context_spread import spread

    # Two contexts of one token and two channels: mean (1, 1); each is at squared distance 1 + 1 from it.
    contexts = torch.tensor([[[0.0, 0.0]], [[2.0, 2.0]]])
    assert spread(contexts) == pytest.approx(2.0)
    assert spread(contexts[:1].expand(3, 1, 2)) == 0.0


def test_an_encoder_that_drops_count_words_has_no_count_spread():
    from context_spread import context_spreads

    from softalign.shapes.vocabulary import NUMBER_WORDS

    numbers = set(NUMBER_WORDS.values()) | {"a"}

    def encode(captions):  # one channel per character of the caption without its count word
        rows = []
        for caption in captions:
            kept = " ".join(word for word in caption.split() if word not in numbers)
            rows.append(torch.tensor([[float(ord(ch)) for ch in kept.ljust(40)]]))
        return torch.stack(rows)

    result = context_spreads(encode)
    assert result["count_spread"] == 0.0 and result["count_over_shape"] == 0.0
    assert result["shape_spread"] > 0 and result["colour_spread"] > 0


def test_a_tiny_pipeline_has_count_spread():
    from context_spread import context_spreads

    from softalign.families import backbone_for
    from softalign.testing import tiny_pipeline

    torch.manual_seed(0)
    backbone = backbone_for(tiny_pipeline("sd15"))
    result = context_spreads(lambda captions: backbone.encode_prompts(captions)["prompt_embeds"])
    assert result["count_spread"] > 0 and result["count_over_shape"] > 0
