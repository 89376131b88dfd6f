"""The shipped shapes models load offline with the stock pipeline classes, no arguments, and stay well under 50 MB."""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from softalign.families import backbone_for
from softalign.sd3_padding import is_null_t5

pytestmark = pytest.mark.slow  # loads and samples the shipped models: `make test-all`

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize(
    "name, pipeline_class", [("shapes-sd15", StableDiffusionPipeline), ("shapes-sd3", StableDiffusion3Pipeline)]
)
def test_shipped_model_loads_with_the_stock_class_and_draws(name, pipeline_class):
    path = MODELS / name
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 50, f"{name} is {size_mb:.1f} MB"
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert type(pipe) is pipeline_class
    if name == "shapes-sd3":  # CLIP-only conditioning through a null T5, which softalign collapses
        assert pipe.text_encoder_3 is not None and is_null_t5(pipe.text_encoder_3)
        assert backbone_for(pipe).collapsed_padding
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
