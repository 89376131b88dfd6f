"""GenEval's CLIP colour classifier over transformers' CLIPModel: templates, crops on #999, formula, batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softalign.eval import COLORS, Detection, evaluate_detections
from softalign.eval.clip_colors import TEMPLATES, CLIPColorClassifier
from softalign.rewards.clip_core import CLIPCore
from softalign.testing.models import tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    tiny_clip(path)
    return path


def square_image():
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[10:30, 10:30] = (220, 30, 30)  # a red square
    array[:, 40:] = (20, 40, 200)
    return Image.fromarray(array)


def red_square(score=0.95):
    mask = np.zeros((40, 60), dtype=bool)
    mask[12:28, 12:28] = True
    return Detection("cat", score, (8, 8, 32, 32), mask=mask)


def test_templates_are_genevals():
    texts = [t.format(color="orange", name="teddy bear") for t in TEMPLATES]
    assert texts == [
        "a photo of a orange teddy bear",
        "a photo of a orange-colored teddy bear",
        "a photo of a orange object",
    ]


class HandMadeCore:
    """Text and image embeddings built by hand: each colour word a basis vector; images embed as their crop."""

    def __init__(self):
        self.seen_crops = []

    def text_embeds(self, texts):
        rows = []
        for text in texts:
            row = torch.zeros(len(COLORS) + 1)
            row[[c for c, name in enumerate(COLORS) if f" {name}" in text][0]] = 2.0
            row[-1] = 1.0 if "object" in text else 0.5  # template-dependent part, averaged away
            rows.append(row)
        return torch.stack(rows)

    def pil_pixels(self, crops):
        self.seen_crops += crops
        return torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32)).mean(dim=(0, 1)) for c in crops])

    def image_embeds(self, pixels):
        out = torch.zeros(len(pixels), len(COLORS) + 1)
        for row, (r, g, b) in enumerate(pixels.tolist()):
            out[row, COLORS.index("red") if r > max(g, b) else COLORS.index("blue")] = 1.0
        return out


def test_zero_shot_weights_and_logits_follow_genevals_formula():
    core = HandMadeCore()
    classifier = CLIPColorClassifier(core)
    weights = classifier.weights("cat")
    assert weights.shape == (len(COLORS) + 1, len(COLORS))
    texts = [t.format(color="red", name="cat") for t in TEMPLATES]
    expected = F.normalize(core.text_embeds(texts), dim=-1).mean(0)
    assert torch.allclose(weights[:, 0], expected / expected.norm())
    image = square_image()
    logits = classifier.logits(image, [red_square()])
    assert torch.allclose(
        logits[0], 100 * F.normalize(core.image_embeds(torch.tensor([[1.0, 0, 0]])), dim=-1)[0] @ weights
    )
    assert classifier(image, red_square()) == "red"
    # GenEval's crop: the mask over #999 grey, cut to the box.
    crop = np.asarray(core.seen_crops[-1])
    assert crop.shape == (24, 24, 3)
    assert tuple(crop[0, 0]) == (153, 153, 153) and tuple(crop[12, 12]) == (220, 30, 30)


def test_rules_batch_colour_queries_through_classify():
    core = HandMadeCore()
    classifier = CLIPColorClassifier(core, batch_size=2)
    blue = Detection("cat", 0.9, (41, 5, 59, 35), mask=np.pad(np.ones((30, 18), bool), ((5, 5), (41, 1))))
    metadata = {"tag": "colors", "include": [{"class": "cat", "count": 3, "color": "red"}], "prompt": "3 red cats"}
    detections = [red_square(0.97), red_square(0.96), blue]
    correct, reason, _ = evaluate_detections(detections, metadata, color_classifier=classifier, image=square_image())
    assert not correct and reason == "expected red cat>=3, found 2 red; and 2 red, 1 blue"
    assert len(core.seen_crops) == 3  # one classify call, in chunks of 2


def test_tiny_clip_end_to_end_and_batching(clip_dir):
    classifier = CLIPColorClassifier.from_pretrained(clip_dir)
    assert CLIPColorClassifier.from_pretrained(clip_dir).core is classifier.core  # weights loaded once
    image = square_image()
    detections = [red_square(), Detection("dog", 0.9, (40, 0, 60, 40)), Detection("cat", 0.9, (0, 0, 20, 20))]
    colors = classifier.classify(image, detections)
    assert all(c in COLORS for c in colors)
    assert [classifier(image, d) for d in detections] == colors


def test_pil_transform_matches_transformers_clip_processor(clip_dir):
    from transformers import CLIPImageProcessor

    core = CLIPCore.from_pretrained(clip_dir)
    image = square_image()  # 60 x 40: the long side resizes to int(32 * 60 / 40) = 48, crop offset 8 (even)
    ours = core.pil_pixels([image])
    theirs = CLIPImageProcessor.from_pretrained(clip_dir)(images=[image], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # The differentiable tensor path follows it closely (bicubic kernels differ slightly).
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert (core.tensor_pixels(tensor) - ours).abs().mean() < 0.05


def test_bad_clip_directories_are_named(clip_dir, tmp_path):
    import shutil

    for missing, message in (
        ("preprocessor_config.json", "preprocessor_config.json is missing"),
        ("tokenizer.json", "no tokenizer"),
    ):
        broken = tmp_path / missing
        shutil.copytree(clip_dir, broken)
        (broken / missing).unlink()
        with pytest.raises(FileNotFoundError, match=message):
            CLIPCore.from_pretrained(broken)
    vision = tmp_path / "vision"
    shutil.copytree(clip_dir, vision)
    config = json.loads((vision / "config.json").read_text())
    (vision / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="clip_vision_model.*CLIPModel with text and image projections"):
        CLIPCore.from_pretrained(vision)
