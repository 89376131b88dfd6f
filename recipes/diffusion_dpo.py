"""Diffusion-DPO on soft tokens (and/or a LoRA) from preference pairs.

    python recipes/diffusion_dpo.py --model models/shapes-sd15 --out runs/dpo     # pairs made in the shapes world
    python recipes/diffusion_dpo.py --model path/to/sd15 --pairs data/pairs --beta 5000 --train-lora

A `--pairs` folder holds the images and `pairs.jsonl` lines `{"caption": ..., "chosen": "a.png", "rejected": "b.png"}`.
Without it, each pair is a render of a shapes prompt (preferred) and a model sample that fails GenEval's rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from softalign import SoftTokens, load_pipeline, lora_config
from softalign.rl import DiffusionDPOConfig, DiffusionDPOTrainer


def read_pairs(folder: Path) -> list[dict]:
    path = folder / "pairs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no pairs.jsonl (lines of caption, chosen, rejected).")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from error
            rows.append(
                {"caption": row["caption"], "chosen": folder / row["chosen"], "rejected": folder / row["rejected"]}
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", help="Folder with pairs.jsonl and images.")
    parser.add_argument("--out", default="runs/diffusion-dpo")
    parser.add_argument("--soft-tokens")
    parser.add_argument("--train-lora", action="store_true")
    parser.add_argument("--beta", type=float, default=5000.0)
    parser.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo"])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    if args.soft_tokens:
        tokens = SoftTokens.from_pretrained(args.soft_tokens)
    else:  # initialised as its config says (SD1.x: the null-prompt BOS state)
        tokens = SoftTokens.for_pipeline(pipe, objective="softrepa")
    if args.pairs:
        pairs = read_pairs(Path(args.pairs))
    else:
        from softalign.shapes.detector import ShapesDetector
        from softalign.shapes.pairs import preference_pairs
        from softalign.shapes.prompts import split_prompts

        pairs = preference_pairs(pipe, split_prompts("train"), ShapesDetector.load(), sample_steps=args.sample_steps)
    peft = lora_config(4) if args.train_lora else None
    config = DiffusionDPOConfig(output_dir=args.out, beta=args.beta, loss_type=args.loss_type, max_steps=args.max_steps)
    trainer = DiffusionDPOTrainer(pipe, config, pairs, soft_tokens=tokens, peft_config=peft)
    last = trainer.train().log_history[-1]
    print(f"final loss {last['loss']:.4f}, implicit accuracy {last['implicit_accuracy']:.2f}")
    path = trainer.save_model()  # <out>/adapter, and <out>/lora/softalign with --train-lora
    print(f"adapter: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
