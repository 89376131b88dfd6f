"""Per-prompt reward normalisation (DDPO's `PerPromptStatTracker`): advantages against each prompt's own history."""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    """Keeps the last `buffer_size` rewards of each prompt; a prompt with fewer than `min_count` uses the whole
    batch's mean and std instead."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts, rewards) -> np.ndarray:
        """Advantages of `rewards`: normalised by their prompt's running statistics, or globally below `min_count`."""
        prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(mine.tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[prompts == prompt] = (mine - mean) / std
        return advantages

    def state_dict(self) -> dict:
        """The buffered rewards per prompt (for checkpoints)."""
        return {prompt: list(values) for prompt, values in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict()` returned."""
        self.stats = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}
