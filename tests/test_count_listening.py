"""scripts/count_listening.py: the denoiser's own error as a count classifier."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_score_candidates_by_hand():
    from count_listening import score_candidates

    errors = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.3, 0.3], [0.4, 0.4, 0.6]])
    hits, margins = score_candidates(errors, truth=1)
    assert hits == [True, False, False]  # the third image ties 0.4 / 0.4: argmin takes the first
    assert margins == pytest.approx([0.5 - 0.2, 0.1 - 0.3, 0.4 - 0.4])


def test_a_model_that_cannot_read_the_caption_is_at_the_floor():
    from count_listening import listening

    from softalign.families import backbone_for
    from softalign.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline("sd15")
    # Zero every cross-attention value projection: the caption can no longer reach the UNet's output.
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2.to_v"):
            torch.nn.init.zeros_(module.weight)
    result = listening(backbone_for(pipe), "heldout", images_per_prompt=2, timesteps=[500], seed=0)
    # All four captions give the same error, so the guess is always the first candidate, "two": right exactly for
    # the held-out prompts that ask for two (3 of the 9), with margin 0.
    assert result["per_count"] == {"2": 1.0, "3": 0.0, "4": 0.0}
    assert result["accuracy"] == pytest.approx(3 / 9)
    assert result["n"] == 9 * 2 and result["margin"] == 0.0
    assert result["caption_effect"] == 0.0  # the four captions give the same prediction: nothing to amplify
