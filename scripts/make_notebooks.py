"""Write the notebooks in notebooks/ (run: python scripts/make_notebooks.py); edit the cells here, not the .ipynb."""

import nbformat as nbf


def notebook(cells, path):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(c[1]) if c[0] == "md" else nbf.v4.new_code_cell(c[1]) for c in cells]
    for i, cell in enumerate(nb.cells):  # fixed ids, so that writing the notebooks again changes only what changed
        cell.id = f"cell-{i}"
    nbf.write(nb, path)


SETUP = """import os
from pathlib import Path

import torch
from IPython.display import display

# Tests run this notebook with SOFTALIGN_NOTEBOOK_BUDGET=tiny (a tiny in-process model, a few steps).
TINY = os.environ.get("SOFTALIGN_NOTEBOOK_BUDGET") == "tiny"
torch.set_num_threads(1 if TINY else 2)
ROOT = Path(os.environ.get("SOFTALIGN_ROOT", "..")).resolve()
WORK = Path(os.environ.get("SOFTALIGN_NOTEBOOK_DIR", "runs/notebooks"))"""

LOAD = """from softalign import load_pipeline
from softalign.testing import tiny_pipeline

if TINY or not (ROOT / "models" / "shapes-sd15" / "model_index.json").is_file():
    pipe = tiny_pipeline("sd15")
else:
    pipe = load_pipeline(str(ROOT / "models" / "shapes-sd15"))
side = pipe.unet.config.sample_size * pipe.vae_scale_factor
print(type(pipe).__name__, f"{side}x{side}")"""

notebook(
    [
        (
            "md",
            "# Composing trainers on one set of soft tokens\n\nSoftAlign (AGSM) trains soft tokens without a reward; "
            "DDPO and Diffusion-DPO then train **the same `SoftTokens` object**. Each stage takes `soft_tokens=` and "
            "the same pipeline, so chaining is passing objects on.",
        ),
        ("code", SETUP),
        ("code", LOAD),
        ("md", "## Stage 1: AGSM on shapes-world image-caption pairs"),
        (
            "code",
            """import numpy as np

from softalign import SoftAlignConfig, SoftAlignTrainer
from softalign.shapes.data import sample_metadata
from softalign.shapes.prompts import split_prompts
from softalign.shapes.render import render_scene

rng = np.random.default_rng(0)
lines = split_prompts("train")
pairs = []
for _ in range(16 if TINY else 512):
    line = sample_metadata(rng, lines)
    pairs.append((render_scene(line, rng, size=side)[0], line["prompt"]))

stage1 = SoftAlignTrainer(pipe, SoftAlignConfig(output_dir=str(WORK / "stage1"), max_steps=2 if TINY else 300,
                                                resolution=side, save_steps=0, train_batch_size=8, chunk_size=8),
                          pairs)
stage1.train()
tokens = stage1.soft_tokens
print(stage1.state.log_history[-1])""",
        ),
        (
            "code",
            """prompts = ["a photo of three circles", "a photo of a red square and a blue star"]
generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
images = pipe(prompts, num_inference_steps=2 if TINY else 20, generator=generator).images
for image in images:
    display(image.resize((128, 128)))""",
        ),
        ("md", "## Stage 2: DDPO with the GenEval-rule reward, same tokens"),
        (
            "code",
            """import random

from softalign.rl import DDPOConfig, DDPOTrainer, GenEvalReward

chooser = random.Random(0)

def prompt_fn():
    line = lines[chooser.randrange(len(lines))]
    return line["prompt"], line

ddpo = DDPOTrainer(DDPOConfig(output_dir=str(WORK / "ddpo"), num_epochs=1 if TINY else 4,
                              sample_num_steps=2 if TINY else 20, sample_batch_size=4, train_batch_size=4,
                              sample_num_batches_per_epoch=1, resolution=side),
                   GenEvalReward(dense=True), prompt_fn, pipe, soft_tokens=tokens,
                   alongside=stage1)  # config.alongside_weight > 0 would add the AGSM term at every step
print(ddpo.train()[-1])""",
        ),
        ("md", "## Stage 3: Diffusion-DPO, same tokens"),
        (
            "code",
            """from PIL import Image

from softalign.rl import DiffusionDPOConfig, DiffusionDPOTrainer

rows = [{"caption": caption, "chosen": image, "rejected": Image.new("RGB", image.size, "white")}
        for image, caption in pairs[:8]]
dpo = DiffusionDPOTrainer(pipe, DiffusionDPOConfig(output_dir=str(WORK / "dpo"), max_steps=2 if TINY else 50,
                                                   resolution=side, logging_steps=1), rows, soft_tokens=tokens)
print(dpo.train()[-1])
images = pipe(prompts, num_inference_steps=2 if TINY else 20, generator=generator).images
for image in images:
    display(image.resize((128, 128)))""",
        ),
        (
            "code",
            """from softalign import save_soft_tokens

print(save_soft_tokens(tokens, WORK / "adapter"))""",
        ),
    ],
    "notebooks/composing_trainers.ipynb",
)

notebook(
    [
        (
            "md",
            "# Adding alignment to an existing TRL DDPO set-up\n\nA trl<=0.23 script uses `DefaultDDPOStableDiffusionPipeline` and "
            "`DDPOTrainer`. Two changed lines carry soft tokens through them (and fix trl 0.23.1's known defects); "
            "a third adds the AGSM term alongside DDPO's loss.",
        ),
        ("code", SETUP),
        ("code", LOAD),
        (
            "code",
            """from trl import DDPOConfig

from softalign.rl.trl import SoftAlignDDPOTrainer, SoftTokenDDPOStableDiffusionPipeline


def reward_fn(images, prompts, metadata):  # the TRL contract; brightness keeps the demo cheap
    return images.float().mean(dim=(1, 2, 3)), {}


def prompt_fn():
    return "a photo of three circles", {}

config = DDPOConfig(num_epochs=1 if TINY else 4, sample_num_steps=2 if TINY else 20, sample_batch_size=2,
                    sample_num_batches_per_epoch=1, train_batch_size=2, train_gradient_accumulation_steps=1,
                    mixed_precision="no", project_kwargs={"project_dir": str(WORK / "trl")})""",
        ),
        ("md", "## Before: train soft tokens with AGSM, then hand them to TRL"),
        (
            "code",
            """import numpy as np

from softalign import SoftAlignConfig, SoftAlignTrainer
from softalign.shapes.data import sample_metadata
from softalign.shapes.prompts import split_prompts
from softalign.shapes.render import render_scene

rng = np.random.default_rng(0)
lines = split_prompts("train")
pairs = [(render_scene(line, rng, size=side)[0], line["prompt"]) for line in
         (sample_metadata(rng, lines) for _ in range(16 if TINY else 256))]
align = SoftAlignTrainer(pipe, SoftAlignConfig(output_dir=str(WORK / "agsm"), max_steps=2 if TINY else 200,
                                               resolution=side, save_steps=0), pairs)
align.train()

# the changed lines:
pipeline = SoftTokenDDPOStableDiffusionPipeline.from_pipeline(pipe, soft_tokens=align.soft_tokens)
trainer = SoftAlignDDPOTrainer(config, reward_fn, prompt_fn, pipeline)
trainer.train()
print("tokens after TRL DDPO:", align.soft_tokens.tokens.norm().item())""",
        ),
        ("md", "## Alongside: the AGSM term added to every DDPO step"),
        (
            "code",
            """alongside = SoftAlignDDPOTrainer(config, reward_fn, prompt_fn, pipeline, alongside=align, alongside_weight=0.5)
alongside.train()  # AGSM's term on each step, its EMA after each step, its tensors in each checkpoint
print("last alongside loss:", alongside.last_alongside_loss)""",
        ),
    ],
    "notebooks/trl_alignment.ipynb",
)

notebook(
    [
        (
            "md",
            "# Loading the tokens released with SoftREPA and AGSM\n\nThe papers release `.pth` files "
            "(`softrepa/SoftREPA` `tokens/<model>/dc_tokens.pth`, `dc_t_tokens.pth`; `jaayeon/AGSM` "
            "`checkpoints/<model>/soft_tokens.pth`, `soft_t_tokens.pth`). `softalign convert` turns them into "
            "adapters, reading the pickles with `weights_only=True`.\n\nWith the real files and a local SD1.5:\n\n"
            "```bash\nsoftalign convert SoftREPA/tokens/sd1.5 softrepa-sd15 --format softrepa\n```\n```python\n"
            "pipe = StableDiffusionPipeline.from_pretrained('path/to/sd15')\nload_soft_tokens(pipe, 'softrepa-sd15')\n"
            "pipe('two cats on a sofa').images[0]\n```\n\nOffline, this notebook writes files with the released "
            "layout and loads them into a small pipeline with the same context width (768).",
        ),
        ("code", SETUP),
        (
            "code",
            """import torch

from softalign.testing import tiny_pipeline

release = WORK / "release-sd15"
release.mkdir(parents=True, exist_ok=True)
torch.save(torch.nn.Parameter(torch.randn(4, 768) * 0.5), release / "dc_tokens.pth")   # as the official code saves
torch.save(torch.nn.Embedding(100, 768), release / "dc_t_tokens.pth")
pipe = tiny_pipeline("sd15", cross_attention_dim=768)""",
        ),
        (
            "code",
            """from softalign import convert_official_tokens, save_soft_tokens

# the same as `softalign convert <release> <out> --format softrepa` on the command line
save_soft_tokens(convert_official_tokens(release, format="softrepa"), WORK / "softrepa-sd15")""",
        ),
        (
            "code",
            """from softalign import load_soft_tokens, unload_soft_tokens

call = dict(num_inference_steps=2 if TINY else 20, height=32, width=32)
base = pipe("two cats on a sofa", generator=torch.Generator().manual_seed(0), **call).images[0]
load_soft_tokens(pipe, WORK / "softrepa-sd15")
tuned = pipe("two cats on a sofa", generator=torch.Generator().manual_seed(0), **call).images[0]
unload_soft_tokens(pipe)
display(base.resize((128, 128)), tuned.resize((128, 128)))""",
        ),
    ],
    "notebooks/released_tokens.ipynb",
)
