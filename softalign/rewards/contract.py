"""The reward contract, and adapters that put a user's point-wise or group-wise reward under it.

**The contract** (DDPO's, TRL's `DDPOTrainer` too): `reward_fn(images, prompts, metadata) -> (rewards, info)`

- `images`: a float tensor `(B, 3, H, W)` in [0, 1] (what the trainers pass), or a list of PIL images;
- `prompts`: `B` strings; `metadata`: `B` entries, whatever `prompt_fn` returned with each prompt;
- `rewards`: `B` finite numbers (a tensor or a sequence); `info`: a dict of extra values to log (may be empty).

A reward is called without gradients by the policy-gradient trainers; TRL's `async_reward_computation=True` calls
it from a worker thread, so a reward must not depend on mutable state beyond its loaded weights (the scorers here
hold none). For reward-gradient methods (AlignProp-style), a [`Scorer`]'s `score(images, prompts)` is
differentiable in `images`.

**Declared inputs.** [`as_reward_fn`] wraps a plain function that wants PIL images (`inputs="pil"`) or tensors
(`inputs="tensor"`), converting what the trainer passes.

**Group-wise rewards** score all the samples of one prompt together (a ranking within the group, a diversity
bonus, a preference model comparing candidates): `fn(images_of_one_prompt, prompt, metadata_of_group) -> n scores`.
[`as_reward_fn`] with `group_wise=True` groups a batch by prompt, calls `fn` once per group and puts the scores
back in batch order. A group is the samples of a prompt *in one call*; sample several images per prompt in a
batch (e.g. a `prompt_fn` that repeats prompts) to make groups larger than one.

**A separate evaluation reward**: training and evaluation take rewards independently (a trainer's
`reward_function`, `softalign eval --metrics`), so a policy trained on one scorer can be judged by another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..rl.rewards import to_pil_images

INPUTS = ("tensor", "pil")


def to_tensor_images(images) -> torch.Tensor:
    """PIL images (one size), a `(B, H, W, 3)` array or a `(B, 3, H, W)` tensor -> `(B, 3, H, W)` float in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        return images
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        sizes = {image.size for image in images}
        if len(sizes) != 1:
            raise ValueError(f"PIL images must share one size to be stacked into a tensor, got sizes {sorted(sizes)}")
        array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    else:
        array = np.asarray(images, dtype=np.float32)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3), got {array.shape}")
        if array.max(initial=0) > 1:
            array = array / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _convert(images, inputs: str):
    return to_pil_images(images) if inputs == "pil" else to_tensor_images(images)


def _rewards_tensor(values, n: int, where: str) -> torch.Tensor:
    rewards = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values, dtype=torch.float32)
    rewards = rewards.reshape(-1).cpu()
    if rewards.numel() != n:
        raise ValueError(f"{where} returned {rewards.numel()} scores for {n} images")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{where} returned non-finite scores: {rewards.tolist()}")
    return rewards


def as_reward_fn(fn: Callable, inputs: str = "tensor", group_wise: bool = False, name: str | None = None) -> Callable:
    """Put `fn` under the reward contract.

    Args:
        fn (`Callable`): point-wise `fn(images, prompts, metadata) -> scores` (scores alone or `(scores, info)`), or
            with `group_wise=True`, `fn(images, prompt, metadata) -> scores` for the images of one prompt.
        inputs (`str`, *optional*, defaults to `"tensor"`): what `fn` takes: `"tensor"` (`(n, 3, H, W)` in [0, 1])
            or `"pil"` (a list of RGB PIL images).
        group_wise (`bool`, *optional*, defaults to `False`): call `fn` once per prompt group.
        name (`str`, *optional*): the name used in errors (default: `fn`'s).

    Returns:
        `Callable`: `reward_fn(images, prompts, metadata) -> (rewards float32 tensor [B], info dict)`.

    Example:

    ```python
    >>> def rank_in_group(images, prompt, metadata):  # group-wise: brightest image of each prompt gets 1
    ...     brightness = images.mean(dim=(1, 2, 3))
    ...     return brightness.argsort().argsort().float() / max(len(images) - 1, 1)
    >>> reward_fn = as_reward_fn(rank_in_group, group_wise=True)
    ```
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {list(INPUTS)}, got {inputs!r}")
    where = name or getattr(fn, "__name__", type(fn).__name__)

    def reward_fn(images, prompts, metadata=None):
        prompts = list(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        if len(metadata) != len(prompts):
            raise ValueError(f"{where}: got {len(prompts)} prompts but {len(metadata)} metadata entries")
        converted = _convert(images, inputs)
        if len(converted) != len(prompts):
            raise ValueError(f"{where}: got {len(converted)} images but {len(prompts)} prompts")
        if not group_wise:
            out = fn(converted, prompts, metadata)
            scores, info = out if isinstance(out, tuple) else (out, {})
            return _rewards_tensor(scores, len(prompts), where), dict(info)
        rewards = torch.zeros(len(prompts))
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(index)
        for prompt, indices in groups.items():
            members = converted[torch.tensor(indices)] if inputs == "tensor" else [converted[i] for i in indices]
            scores = fn(members, prompt, [metadata[i] for i in indices])
            rewards[torch.tensor(indices)] = _rewards_tensor(scores, len(indices), f"{where} (prompt {prompt!r})")
        return rewards, {"groups": len(groups)}

    reward_fn.__name__ = where
    return reward_fn


class Scorer:
    """A reward / metric model with the three uses; subclasses implement `score`.

    - `scorer(images, prompts, metadata) -> (rewards, info)`: the reward contract, no gradients, float32 on CPU;
    - `scorer.score(images, prompts) -> (B,)`: differentiable in `images`, a `(B, 3, H, W)` tensor in [0, 1];
    - `scorer.metric(images, prompts) -> list[float]`: the evaluation metric on PIL images, through the model's
      exact preprocessing (the number to report).
    """

    name = "score"
    needs_prompts = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable scores `(B,)` of images `(B, 3, H, W)` in [0, 1] for their prompts."""
        raise NotImplementedError

    def metric_scores(self, images: list[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Scores `(B,)` of PIL images for their prompts, preprocessed as the model's own processor does."""
        raise NotImplementedError

    @torch.no_grad()
    def metric(self, images, prompts: Sequence[str], batch_size: int = 32) -> list[float]:
        """Scores of PIL images (or anything [`to_pil_images`] takes), in batches of `batch_size`."""
        pil, prompts = to_pil_images(images), list(prompts)
        if len(pil) != len(prompts):
            raise ValueError(f"{self.name}: got {len(pil)} images but {len(prompts)} prompts")
        out: list[float] = []
        for start in range(0, len(pil), batch_size):
            scores = self.metric_scores(pil[start : start + batch_size], prompts[start : start + batch_size])
            out += scores.float().cpu().tolist()
        return out

    def __call__(self, images, prompts, metadata=None) -> tuple[torch.Tensor, dict]:
        """TRL's DDPO `reward_fn`: `(rewards (B,), info)` for images in [0, 1], without gradient."""
        prompts = list(prompts)
        images = to_tensor_images(images)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        with torch.no_grad():
            scores = self.score(images, prompts)
        return _rewards_tensor(scores, len(prompts), self.name), {}
