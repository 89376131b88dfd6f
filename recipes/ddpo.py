"""DDPO on soft tokens (and/or a LoRA) with the GenEval-rule reward of the shapes world, or JPEG compressibility.

python recipes/ddpo.py --model models/shapes-sd15 --out runs/ddpo                      # counting & co. reward
python recipes/ddpo.py --model models/shapes-sd15 --soft-tokens runs/agsm/adapter      # continue from AGSM
python recipes/ddpo.py --model path/to/sd15 --reward jpeg --prompts prompts.txt --train-lora
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from softalign import SoftTokens, SoftTokensConfig, read_soft_tokens, save_soft_tokens
from softalign.backbones import context_dim_of, family_of
from softalign.cli import load_pipeline
from softalign.rl import DDPOConfig, DDPOTrainer, GenEvalReward, jpeg_compressibility
from softalign.shapes.prompts import split_prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="runs/ddpo")
    parser.add_argument("--soft-tokens", help="Start from this adapter (else new tokens).")
    parser.add_argument("--train-lora", action="store_true")
    parser.add_argument("--reward", default="geneval", choices=["geneval", "geneval_exact", "jpeg"])
    parser.add_argument("--prompts", help="Text file of prompts (jpeg reward); default: shapes training prompts.")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    if args.soft_tokens:
        tokens = read_soft_tokens(args.soft_tokens)
    else:
        tokens = SoftTokens(SoftTokensConfig.for_family(family_of(pipe), dim=context_dim_of(pipe)))
    if args.prompts:
        texts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        lines = [{"prompt": text} for text in texts]
    else:
        lines = split_prompts("train")
    rng = random.Random(0)

    def prompt_fn():
        line = lines[rng.randrange(len(lines))]
        return line["prompt"], line

    reward = jpeg_compressibility if args.reward == "jpeg" else GenEvalReward(dense=args.reward == "geneval")
    peft = None
    if args.train_lora:
        from peft import LoraConfig

        peft = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    config = DDPOConfig(
        output_dir=args.out,
        num_epochs=args.epochs,
        sample_num_steps=args.sample_steps,
        sample_batch_size=args.batch_size,
        train_batch_size=args.batch_size,
        sample_num_batches_per_epoch=2,
        train_learning_rate=3e-3,
        train_timestep_fraction=0.5,
    )
    trainer = DDPOTrainer(config, reward, prompt_fn, pipe, soft_tokens=tokens, peft_config=peft)
    for record in trainer.train():
        print(f"epoch {record['epoch']}: reward {record['reward_mean']:.3f}")
    save_soft_tokens(tokens, Path(args.out) / "adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
