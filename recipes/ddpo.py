"""DDPO on soft tokens (and/or a LoRA) with the GenEval-rule reward of the shapes world, or JPEG compressibility.

python recipes/ddpo.py --model models/shapes-sd15 --guidance-scale 1.5 --out runs/ddpo       # GenEval-rule reward
python recipes/ddpo.py --model models/shapes-sd15 --guidance-scale 1.5 --tags counting --train-lora \
    --learning-rate 3e-3 --train-batch-size 4 --epochs 15 --out runs/ddpo-counting             # the counting reward
python recipes/ddpo.py --model models/shapes-sd15 --soft-tokens runs/agsm/adapter            # continue from AGSM
python recipes/ddpo.py --model path/to/sd15 --reward jpeg --prompts prompts.txt --train-lora

Writes `<out>/adapter` (soft tokens) and, with `--train-lora`, `<out>/lora/softalign`; score them with
`softalign eval --model M --soft-tokens <out>/adapter --lora <out>/lora/softalign --guidance-scale 1.5 --out DIR`.
Shapes prompts are drawn a tag uniformly, then a prompt of that tag (color_attr has 17x the prompts of counting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from softalign import SoftTokens, load_pipeline, lora_config
from softalign.rl import DDPOConfig, DDPOTrainer, GenEvalReward, jpeg_compressibility
from softalign.shapes.data import prompt_sampler
from softalign.shapes.prompts import parse_tags, split_prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="runs/ddpo")
    parser.add_argument("--soft-tokens", help="Start from this adapter (else new tokens).")
    parser.add_argument("--train-lora", action="store_true")
    parser.add_argument("--n-tokens", type=int, help="New tokens: soft tokens per bank (default: the family's).")
    parser.add_argument(
        "--unet-blocks", help="New tokens: UNet block groups that see them, e.g. down,mid,up (default: the family's)."
    )
    parser.add_argument("--reward", default="geneval", choices=["geneval", "geneval_exact", "jpeg"])
    parser.add_argument("--prompts", help="Text file of prompts (jpeg reward); default: shapes training prompts.")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="Trajectories per sampling batch (2 per epoch).")
    parser.add_argument("--train-batch-size", type=int, help="Trajectories per optimiser step (default: --batch-size).")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--timestep-fraction",
        type=float,
        default=0.5,
        help="Share of each trajectory's steps trained on (TRL's train_timestep_fraction); 0.25 at 20 steps trains "
        "as many steps as 0.5 at 10.",
    )
    parser.add_argument("--clip-range", type=float, default=1e-4, help="PPO ratio clip (TRL's train_clip_range).")
    parser.add_argument(
        "--eta", type=float, default=1.0, help="DDIM eta while sampling (> 0: the log-probs need noise)."
    )
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG while sampling (shapes models: 1.5).")
    parser.add_argument("--tags", help="Comma-separated shapes tags to train on (default: all six).")
    parser.add_argument(
        "--kl-coef", type=float, default=0.0, help="KL penalty to the starting policy (Flow-GRPO's beta; 0: none)."
    )
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument(
        "--lora-targets",
        default="to_q,to_k,to_v,to_out.0",
        help="Comma-separated module-name suffixes the LoRA wraps (e.g. attn1.to_q for self-attention only).",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="Score the held-out prompts of --tags every N epochs (0: never)."
    )
    parser.add_argument("--eval-images-per-prompt", type=int, default=40)
    parser.add_argument("--eval-steps", type=int, default=20, help="Sampling steps of the held-out evaluations.")
    parser.add_argument("--seed", type=int, default=0, help="Prompt order and DDPO sampling seed.")
    args = parser.parse_args(argv)
    if args.soft_tokens and (args.n_tokens is not None or args.unet_blocks is not None):
        parser.error("--n-tokens / --unet-blocks shape new tokens; --soft-tokens brings its own layout")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    if args.soft_tokens:
        tokens = SoftTokens.from_pretrained(args.soft_tokens)
    else:
        layout = {"n_tokens": args.n_tokens} if args.n_tokens is not None else {}
        if args.unet_blocks is not None:
            layout["unet_blocks"] = args.unet_blocks.split(",")
        # initialised as its config says (SD1.x: the null-prompt BOS state)
        tokens = SoftTokens.for_pipeline(pipe, **layout)
    if args.prompts:
        texts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        lines = [{"prompt": text} for text in texts]
    else:
        lines = split_prompts("train")
        if args.tags:
            try:
                wanted = parse_tags(args.tags)
            except ValueError as error:
                parser.error(f"--tags: {error}")
            lines = [line for line in lines if line["tag"] in wanted]
    prompt_fn = prompt_sampler(lines, seed=args.seed)
    reward = jpeg_compressibility if args.reward == "jpeg" else GenEvalReward(dense=args.reward == "geneval")
    peft = lora_config(args.lora_rank, args.lora_targets.split(",")) if args.train_lora else None
    config = DDPOConfig(
        output_dir=args.out,
        num_epochs=args.epochs,
        sample_num_steps=args.sample_steps,
        sample_batch_size=args.batch_size,
        train_batch_size=args.train_batch_size or args.batch_size,
        sample_num_batches_per_epoch=2,
        sample_guidance_scale=args.guidance_scale,
        train_learning_rate=args.learning_rate,
        train_timestep_fraction=args.timestep_fraction,
        sample_eta=args.eta,
        train_clip_range=args.clip_range,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_min_count=8,
        seed=args.seed,
        kl_coef=args.kl_coef,
    )
    trainer = DDPOTrainer(config, reward, prompt_fn, pipe, soft_tokens=tokens, peft_config=peft)
    if args.eval_every and not args.prompts:
        wanted = {line["tag"] for line in lines}
        heldout = [line for line in split_prompts("heldout") if line["tag"] in wanted]
        train_with_heldout_curve(trainer, pipe, args, heldout)
    else:
        for record in trainer.train().log_history:
            print(f"epoch {record['epoch']}: reward {record['reward_mean']:.3f}")
    trainer.save_model(Path(args.out) / "adapter")
    return 0


def train_with_heldout_curve(trainer, pipe, args, heldout: list[dict]) -> None:
    """Train in chunks of `--eval-every` epochs and score the held-out prompts after each (and before the first).

    Writes `<out>/heldout-curve.jsonl` (one row per evaluation: epoch, accuracy per tag and overall) and
    `<out>/heldout-curve.png`; each evaluation's images and report are in `<out>/evals/epoch-NNN/`. RL on a few
    hundred samples is noisy, and the curve shows whether a final number is a peak, a plateau or a collapse.
    """
    import json

    from softalign.curves import plot_curves
    from softalign.eval.run import run_evaluation
    from softalign.shapes.detector import ShapesDetector

    out, detector = Path(args.out), ShapesDetector.load()
    plan = [(line, args.eval_images_per_prompt) for line in heldout]
    rows = []
    epoch = trainer.epoch
    while True:
        summary = run_evaluation(
            pipe,
            plan,
            detector,
            out / "evals" / f"epoch-{epoch:03d}",
            seed=1234,
            num_inference_steps=args.eval_steps,
            guidance_scale=args.guidance_scale,
            progress=False,
        )
        row = {"epoch": epoch, "overall": summary["overall"], **{t: v["accuracy"] for t, v in summary["tags"].items()}}
        rows.append(row)
        (out / "heldout-curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"epoch {epoch}: held-out {row}", flush=True)
        points = [{"step": r["epoch"], "value": r["overall"]} for r in rows]
        plot_curves({"held-out accuracy by epoch": points}, out / "heldout-curve.png")  # kept current: runs get cut
        if epoch >= args.epochs:
            break
        epoch = min(args.epochs, epoch + args.eval_every)
        for record in trainer.train(epochs=epoch).log_history[-args.eval_every :]:
            print(f"epoch {record['epoch']}: reward {record['reward_mean']:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
