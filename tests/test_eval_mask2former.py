"""The transformers Mask2Former detector: GenEval's names, mmdet's input sizes, scores, boxes from masks, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from softalign.eval import Detection, evaluate_image
from softalign.eval.coco import GENEVAL_CLASSES, geneval_names
from softalign.eval.mask2former import Mask2FormerDetector, masks_to_boxes, resized_size
from softalign.testing.models import tiny_clip, tiny_mask2former


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask2former")
    tiny_mask2former(path)
    return path


def noise_image(height=40, width=56, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_class_names_are_genevals_exactly():
    assert len(GENEVAL_CLASSES) == 80 and len(set(GENEVAL_CLASSES)) == 80
    for name in ("teddy bear", "hair drier", "computer mouse", "tv remote", "computer keyboard", "tv"):
        assert name in GENEVAL_CLASSES
    assert GENEVAL_CLASSES.index("computer mouse") == 64 and GENEVAL_CLASSES.index("toothbrush") == 79
    # COCO / Detectron2 spellings map onto GenEval's; unnamed labels are taken in COCO order.
    coco = {
        i: {64: "mouse", 65: "remote", 66: "keyboard", 78: "hair_drier"}.get(i, n)
        for i, n in enumerate(GENEVAL_CLASSES)
    }
    assert geneval_names(coco) == list(GENEVAL_CLASSES)
    assert geneval_names({str(i): f"LABEL_{i}" for i in range(80)}) == list(GENEVAL_CLASSES)
    with pytest.raises(ValueError, match="133 labels .*panoptic"):
        geneval_names({i: f"c{i}" for i in range(133)})
    with pytest.raises(ValueError, match="not GenEval object names"):
        geneval_names({**coco, 3: "scooter"})
    with pytest.raises(ValueError, match="more than once"):
        geneval_names({**coco, 3: "cat"})


def test_resize_follows_mmdet_keep_ratio():
    assert resized_size(512, 512) == (800, 800)  # SD1.5: upscaled, short side 800
    assert resized_size(1024, 1024) == (800, 800)  # SDXL / SD3
    assert resized_size(640, 480) == (1067, 800)
    assert resized_size(2000, 500) == (1333, 333)  # the long side binds


def test_boxes_from_masks_are_mmdets_extent():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    masks[1, 5, 7] = True
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 1, 5, 3], [7, 5, 8, 6], [0, 0, 0, 0]]


def test_instance_scores_are_class_probability_times_mean_mask_probability():
    stand_in = torch.nn.Linear(1, 1)  # step 3 needs only the label count
    stand_in.config = type("Config", (), {"num_labels": 80})()
    detector = Mask2FormerDetector(stand_in, list(GENEVAL_CLASSES), max_per_image=3)
    class_logits = torch.full((2, 81), -20.0)
    class_logits[0, 15] = 5.0  # query 0: a cat
    class_logits[1, 16] = 4.0  # query 1: a dog
    mask_logits = torch.full((2, 6, 8), -3.0)
    mask_logits[0, 1:3, 2:5] = 2.0
    mask_logits[1, 4:6, 0:2] = 1.0
    detections = detector._instances(class_logits, mask_logits)
    assert len(detections) == 3
    by_label = {d.label: d for d in detections}
    probs = class_logits.softmax(-1)
    cat = by_label["cat"]
    assert cat.precision == "float32" and cat.box == (2.0, 1.0, 5.0, 3.0)
    assert cat.score == float(np.float32(probs[0, 15] * torch.sigmoid(torch.tensor(2.0)) * 6 / (6 + 1e-6)))
    assert by_label["dog"].box == (0.0, 4.0, 2.0, 6.0) and by_label["dog"].mask.sum() == 4


def test_from_pretrained_detects_in_geneval_format(detector_dir):
    detector = Mask2FormerDetector.from_pretrained(detector_dir)
    image = noise_image()
    detections = detector(image)
    assert len(detections) == 100  # mmdet's max_per_image of 6 queries x 80 classes
    for d in detections:
        assert isinstance(d, Detection) and d.label in GENEVAL_CLASSES and d.precision == "float32"
        assert d.mask.shape == (40, 56) and 0 <= d.score <= 1
        if d.mask.any():
            ys, xs = np.nonzero(d.mask)
            assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # Images of equal size share a forward pass (same scores to float tolerance); another size goes on its own.
    small = Mask2FormerDetector.from_pretrained(detector_dir, scale=(133, 80))
    alone = small(image)
    batch = small.detect([image, noise_image(seed=1), noise_image(32, 32)])
    assert [(d.label, d.box) for d in batch[0]] == [(d.label, d.box) for d in alone]
    assert [d.score for d in batch[0]] == pytest.approx([d.score for d in alone], rel=1e-4)
    assert batch[2][0].mask.shape == (32, 32)
    metadata = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    correct, reason, details = evaluate_image(image, metadata, small)
    assert isinstance(correct, bool) and json.dumps(details)


def test_bad_checkpoints_are_named(tmp_path, detector_dir):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Mask2FormerDetector.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Mask2FormerDetector.from_pretrained(tmp_path / "empty")
    clip = tmp_path / "clip"
    tiny_clip(clip)
    with pytest.raises(ValueError, match="model_type is 'clip'.*mask2former"):
        Mask2FormerDetector.from_pretrained(clip)
    panoptic = tmp_path / "panoptic"
    tiny_mask2former(panoptic, id2label={i: f"class{i}" for i in range(133)})
    with pytest.raises(ValueError, match=f"{os.sep}config.json: the checkpoint has 133 labels"):
        Mask2FormerDetector.from_pretrained(panoptic)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((detector_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        Mask2FormerDetector.from_pretrained(no_weights)


@pytest.mark.slow
def test_real_checkpoint_finds_objects_env():
    path = os.environ.get("SOFTALIGN_MASK2FORMER")
    image_path = os.environ.get("SOFTALIGN_MASK2FORMER_IMAGE")  # a photo, e.g. COCO val 39769 (two cats, remotes)
    if not path or not image_path:
        pytest.skip("set SOFTALIGN_MASK2FORMER (a local mask2former-swin-small-coco-instance) and ..._IMAGE")
    detector = Mask2FormerDetector.from_pretrained(path)
    confident = [d for d in detector(Image.open(image_path)) if d.score > 0.3]
    assert {"cat"} <= {d.label for d in confident}
