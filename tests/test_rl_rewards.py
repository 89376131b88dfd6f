import pytest
import torch
from PIL import Image

from softalign.eval.detections import Detection
from softalign.rl.rewards import GenEvalReward, dense_score, jpeg_compressibility, to_pil_images

THREE = {
    "tag": "counting",
    "include": [{"class": "circle", "count": 3}],
    "exclude": [{"class": "circle", "count": 4}],
    "prompt": "a photo of three circles",
}
RED_LEFT = {
    "tag": "position",
    "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
    "prompt": "a photo of a circle left of a square",
}


def circles(n, score=0.95):
    return [Detection("circle", score, (10 * i, 0, 10 * i + 8, 8), color="red") for i in range(n)]


class FixedDetector:
    def __init__(self, detections):
        self.detections = detections

    def __call__(self, image):
        return self.detections


@pytest.mark.parametrize("n, exact, dense", [(3, 1.0, 1.0), (2, 0.0, 2 / 3), (4, 0.0, (2 / 3) * 0.5), (0, 0.0, 0.0)])
def test_counting_reward_exact_and_dense(n, exact, dense):
    images = torch.rand(1, 3, 16, 16)
    exact_reward, info = GenEvalReward(FixedDetector(circles(n)))(images, ("p",), (THREE,))
    assert exact_reward.tolist() == [exact] and info["correct"].tolist() == [exact]
    dense_reward, _ = GenEvalReward(FixedDetector(circles(n)), dense=True)(images, ("p",), (THREE,))
    assert dense_reward.item() == pytest.approx(dense)


def test_dense_position_credit_and_low_scores_ignored_for_counting():
    square = Detection("square", 0.95, (40, 0, 48, 8))
    left = Detection("circle", 0.95, (0, 0, 8, 8))
    right = Detection("circle", 0.95, (60, 0, 68, 8))
    assert dense_score([square, left], RED_LEFT) == 1.0
    assert dense_score([square, right], RED_LEFT) == 0.5  # the square is there; the relation fails
    assert dense_score(circles(3) + circles(1, score=0.5), THREE) == 1.0  # 0.5 is below counting's 0.9


def test_reward_inputs_are_checked():
    reward = GenEvalReward(FixedDetector([]))
    with pytest.raises(ValueError, match="needs each prompt's GenEval metadata"):
        reward(torch.rand(1, 3, 8, 8), ("p",), ({},))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        reward(torch.rand(1, 8, 8), ("p",), (THREE,))
    with pytest.raises(ValueError, match="Got 2 images, 1 prompts"):
        reward(torch.rand(2, 3, 8, 8), ("p",), (THREE,))


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32)
    rewards, _ = jpeg_compressibility(torch.cat([flat, noisy]))
    assert rewards[0] > rewards[1] and (rewards < 0).all()
    assert len(to_pil_images([Image.new("RGBA", (4, 4))])) == 1
