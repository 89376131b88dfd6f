"""Diffusion-DPO side by side: softalign's `DiffusionDPOTrainer` against a reference in the structure of diffusers'
`examples/research_projects/diffusion_dpo/train_diffusion_dpo.py` with a second, frozen copy of the UNet as the
reference model (as the original SalesforceAIResearch/DiffusionDPO `train.py`; diffusers' LoRA script now disables
the adapter instead, which is what softalign does).

Same SD1.5-class UNet (random weights), same LoRA (rank 4, alpha 4, on `to_q, to_k, to_v, to_out.0`), same preference
pairs, batch, beta and optimiser. Both read the same cached latents and conditioning and draw the same t and noise
(the diffusers script also runs the VAE and the text encoder on every step; that cost is left out here so the ratio
measures the DPO step itself). The loss is the paper's `-log sigmoid(-beta / 2 * (model_diff - ref_diff))` (diffusers'
current script drops the 1/2 from beta).

1. Parity, in this process: from the same starting weights (a LoRA with non-zero A and B, so model and reference
   differ) one step's loss and LoRA gradient agree (the benchmark stops beyond 1e-5).
2. Timing, one process per (variant, repeat), repeats interleaved: seconds per optimiser step after a warm-up step,
   and peak memory from before the models are built (RSS on CPU, `max_memory_allocated` on CUDA), against the size
   of one UNet copy. Targets: softalign's peak at most the reference's minus one UNet copy; its step at most 1.1x.

    python benchmarks/bench_diffusion_dpo.py [--size medium] [--resolution 32] [--batch 4] [--pairs 16] [--steps 10]
        [--repeats 3] [--threads 2] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SD15_SIZES,
    PeakMemory,
    Timer,
    interleaved,
    median_of,
    ratio_table,
    run_worker,
    sd15_pipeline,
    unet_mb,
    write_json,
)

VARIANTS = ("reference", "softalign")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
BETA, LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 5000.0, 1e-4, 1e-4, 1.0, 0


def lora_config():
    """The LoRA both variants train."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def preference_pairs(n: int, size: int) -> list[dict]:
    """`n` rows `{"caption", "chosen", "rejected"}`: the render of the caption, and the render of another caption."""
    import numpy as np

    from softalign.shapes.prompts import split_prompts
    from softalign.shapes.render import render_scene

    rng, lines = np.random.default_rng(0), split_prompts("train")
    rows = []
    for i in range(n):
        line, other = lines[i % len(lines)], lines[(i + 7) % len(lines)]
        chosen, rejected = render_scene(line, rng, size=size)[0], render_scene(other, rng, size=size)[0]
        rows.append({"caption": line["prompt"], "chosen": chosen, "rejected": rejected})
    return rows


def dpo_config(a, output_dir: str):
    """softalign's config for the shared settings."""
    from softalign.rl import DiffusionDPOConfig

    return DiffusionDPOConfig(
        output_dir=output_dir,
        beta=BETA,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        train_batch_size=a.batch,
        max_steps=1,
        seed=SEED,
        resolution=a.resolution,
        logging_steps=1,
    )


# -- the reference, in the structure of diffusers' train_diffusion_dpo.py ------------------------------------------------
class TwoUNetDPO:
    """A trained UNet (LoRA) and a frozen deep copy of it as the reference model; one optimiser step per `step`."""

    def __init__(self, pipe, pairs: list[dict], a):
        from softalign.families import backbone_for, freeze

        freeze(pipe)
        self.backbone, self.batch = backbone_for(pipe), a.batch
        self.ref_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()  # the second copy
        self.unet = pipe.unet
        self.unet.add_adapter(lora_config())  # adapter "default", trainable
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.data = encode_pairs(self.backbone, pairs, a.resolution)

    def loss(self, step: int) -> torch.Tensor:
        """One step's DPO loss; the reference prediction comes from the frozen copy under `no_grad`."""
        noisy, timesteps, encoder_hidden_states, target = draw_inputs(self.backbone, self.data, step, self.batch)
        model_pred = self.unet(noisy, timesteps, encoder_hidden_states).sample
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        with torch.no_grad():
            ref_preds = self.ref_unet(noisy, timesteps, encoder_hidden_states).sample.detach()
            ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
            ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
            ref_losses_w, ref_losses_l = ref_loss.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        inside_term = -0.5 * BETA * (model_diff - ref_diff)
        return -F.logsigmoid(inside_term).mean()

    def step(self, step: int) -> float:
        """Loss, backward, clipping, AdamW step."""
        loss = self.loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


def encode_pairs(backbone, pairs: list[dict], side: int) -> dict:
    """Posterior moments of every chosen / rejected image and the captions' conditioning, as softalign's
    `DiffusionDPOTrainer.prepare_data` caches them."""
    from softalign.data import preprocess
    from softalign.rl.diffusion_dpo_trainer import preference_examples

    examples = preference_examples(pairs)
    moments = {}
    for key in ("chosen", "rejected"):
        pixels = torch.stack([preprocess(e[key].load(), side, True, e[key].source) for e in examples])
        means, stds = zip(*[backbone.encode_image_moments(chunk) for chunk in pixels.split(16)], strict=True)
        moments[key] = (torch.cat(means), torch.cat(stds))
    captions = backbone.encode_prompts([e["caption"] for e in examples])
    return {"moments": moments, "conditioning": captions["prompt_embeds"].cpu()}


def draw_inputs(backbone, data: dict, step: int, batch: int):
    """The rows, latents, t and noise softalign's `_micro_step(step, 0)` draws on one process (the parity check fails if
    this drifts from it); t and noise are shared by the two images of a pair, as in the diffusers script."""
    from softalign.training import epoch_order, step_generator

    generator = step_generator(SEED, step, 0, 0)
    n = data["conditioning"].shape[0]
    epoch, position = divmod(step, max(1, n // batch))
    rows = epoch_order(n, SEED, epoch)[position * batch : (position + 1) * batch]
    latents = []
    for key in ("chosen", "rejected"):
        mean, std = data["moments"][key]
        latents.append(mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator))
    timesteps = torch.randint(0, 1000, (len(rows),), generator=generator).repeat(2)
    noise = torch.randn(latents[0].shape, generator=generator).repeat(2, 1, 1, 1)
    device = backbone.device
    latents, noise, timesteps = torch.cat(latents).to(device), noise.to(device), timesteps.to(device)
    noisy = backbone.add_noise(latents, noise, timesteps)
    target = backbone.training_target(latents, noise, timesteps)
    encoder_hidden_states = data["conditioning"][rows].repeat(2, 1, 1).to(device)
    return noisy, timesteps, encoder_hidden_states, target


def build(variant: str, a, output_dir: str):
    """`variant`'s trainer on a freshly built pipeline (the same seeded weights for both)."""
    pipe = sd15_pipeline(a.size, a.resolution).to(a.device)
    pairs = preference_pairs(a.pairs, a.resolution)
    if variant == "reference":
        return TwoUNetDPO(pipe, pairs, a)
    from softalign.rl import DiffusionDPOTrainer

    trainer = DiffusionDPOTrainer(pipe, dpo_config(a, output_dir), pairs, peft_config=lora_config())
    trainer.prepare_data()
    return trainer


def _lora(unet, adapter: str) -> dict:
    marker = f".{adapter}."
    return {n.replace(marker, "."): p for n, p in unet.named_parameters() if "lora_" in n and marker in n}


def check_parity(a, output_dir: str) -> dict:
    """One step's loss and LoRA gradient of both variants from the same weights: their differences and the loss."""
    from softalign.rl.diffusion_dpo_trainer import DiffusionDPOTrainer

    ours: DiffusionDPOTrainer = build("softalign", a, output_dir)
    reference: TwoUNetDPO = build("reference", a, output_dir)
    theirs_lora, ours_lora = _lora(reference.unet, "default"), _lora(ours.pipe.unet, "softalign")
    assert theirs_lora.keys() == ours_lora.keys()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero; random A and B make the model differ from its reference
        for name, param in theirs_lora.items():
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            ours_lora[name].copy_(param)
    ours_loss = ours._micro_step(0, 0)["loss"]  # its backward fills the gradients
    theirs = reference.loss(0)
    theirs.backward()
    scale = max(p.grad.abs().max().item() for p in theirs_lora.values())
    grad = max((ours_lora[n].grad - p.grad).abs().max().item() for n, p in theirs_lora.items()) / scale
    return {"loss": abs(ours_loss - theirs.item()), "grad": grad, "reference_loss": theirs.item()}


def worker(variant: str, a) -> dict:
    """Build `variant`, one warm-up step, then `a.steps` timed optimiser steps; seconds per step and peak memory."""
    torch.set_num_threads(a.threads)
    import diffusers  # noqa: F401  libraries load before memory is counted
    import peft  # noqa: F401

    import softalign.rl  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as output_dir, PeakMemory(a.device) as memory:
        trainer = build(variant, a, output_dir)
        if variant == "reference":

            def run(first, last):
                for step in range(first, last):
                    trainer.step(step)
        else:
            trainer.save_checkpoint = lambda: None  # the reference writes none either

            def run(first, last):
                trainer.args.max_steps = last
                trainer.train()

        run(0, 1)
        with Timer(a.device) as timer:
            run(1, 1 + a.steps)
        size = unet_mb(trainer.unet if variant == "reference" else trainer.pipe.unet)
    return {
        "variant": variant,
        "step_s": timer.wall / a.steps,
        "cpu_s": timer.cpu / a.steps,
        "peak_mb": memory.mb,
        "unet_mb": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", choices=sorted(SD15_SIZES), help="UNet size (SD1.5 class)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (latents are half)")
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per worker, after one warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    common = [f"--size={a.size}", f"--resolution={a.resolution}", f"--batch={a.batch}", f"--pairs={a.pairs}"]
    common += [f"--steps={a.steps}", f"--threads={a.threads}", f"--device={a.device}"]
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as scratch:
        parity = check_parity(a, scratch)
    print(
        f"parity (one step, loss {parity['reference_loss']:.4f}): |loss diff| = {parity['loss']:.2e}, "
        f"grad diff / max grad = {parity['grad']:.2e}"
    )
    if max(parity["loss"], parity["grad"]) > 1e-5:
        raise SystemExit("The implementations disagree; not timing them.")
    runs = interleaved(list(VARIANTS), a.repeats, lambda v: run_worker(__file__, [v], common, a.threads))
    medians = {v: {k: median_of(runs[v], k) for k in ("step_s", "cpu_s", "peak_mb", "unet_mb")} for v in VARIANTS}
    for values in medians.values():
        values["steps_per_s"] = 1 / values["step_s"]
    saved = medians["reference"]["peak_mb"] - medians["softalign"]["peak_mb"]
    print(
        f"\nDiffusion-DPO, SD1.5-class UNet '{a.size}' ({medians['softalign']['unet_mb']:.0f} MB) at {a.resolution}px, "
        f"{a.batch} pairs per step, LoRA r4, {a.steps} timed steps, median of {a.repeats} interleaved processes, "
        f"{a.threads} threads, {a.device}, torch {torch.__version__}"
    )
    columns = [("steps_per_s", "steps/s", ".3f"), ("cpu_s", "CPU s/step", ".2f"), ("peak_mb", "peak MB", ".0f")]
    print(ratio_table(columns, medians, "reference"))
    print(
        f"\nmemory saved: {saved:.0f} MB = {saved / medians['softalign']['unet_mb']:.2f} UNet copies "
        f"(target >= 1); step time softalign / reference: "
        f"{medians['softalign']['step_s'] / medians['reference']['step_s']:.3f} (target <= 1.1)"
    )
    write_json(
        a.json, {"benchmark": "diffusion_dpo", "settings": vars(a), "parity": parity, "runs": runs, "medians": medians}
    )


if __name__ == "__main__":
    main()
