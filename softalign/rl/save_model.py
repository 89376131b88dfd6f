"""`save_model()` for the RL trainers: the trained soft tokens and LoRA, in the formats the loaders read back."""

from __future__ import annotations

import os
from pathlib import Path


class SaveModelMixin:
    """Needs `self.accelerator`, `self.trainable` (a `TrainableState`) and `self.output_dir`."""

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the trained parameters: soft tokens to `output_dir` (default `<output_dir>/adapter`) in the adapter
        format, the LoRA (when trained) to `<its parent>/lora/softalign/`; load them with `load_soft_tokens` and
        `load_lora`."""
        target = Path(output_dir) if output_dir is not None else self.output_dir / "adapter"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.trainable.save(target)
        return target
