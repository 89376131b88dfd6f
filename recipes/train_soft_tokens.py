"""Train soft tokens with AGSM (or SoftREPA) on image-caption pairs and save the adapter.

    python recipes/train_soft_tokens.py --model models/shapes-sd15 --out runs/agsm                 # shapes-world renders
    python recipes/train_soft_tokens.py --model path/to/sd15 --data data/coco-train --max-steps 20000 --out runs/agsm-sd15
    python recipes/train_soft_tokens.py --model path/to/sd3 --data data/coco-train --objective softrepa --out runs/softrepa
    accelerate launch --num_processes 2 recipes/train_soft_tokens.py --model models/shapes-sd15 --out runs/agsm-2p

Then: `load_soft_tokens(pipe, "runs/agsm/adapter")` and `pipe(prompt)`. (Not named `softalign.py`: a script of the
package's name would shadow the package when run from this folder.)
"""

from __future__ import annotations

import argparse
import sys

from softalign import SoftAlignConfig, SoftAlignTrainer, load_pipeline
from softalign.families import image_side
from softalign.shapes.pairs import shapes_pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="Image folder with metadata.jsonl; default: shapes-world renders.")
    parser.add_argument("--out", default="runs/softalign")
    parser.add_argument("--objective", default="agsm", choices=["agsm", "softrepa"])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=512, help="Shapes renders when no --data is given.")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    if args.data:
        data = args.data
    else:
        data = shapes_pairs(args.images, seed=0)
    config = SoftAlignConfig(
        output_dir=args.out,
        objective=args.objective,
        max_steps=args.max_steps,
        train_batch_size=args.batch_size,
        chunk_size=args.batch_size,
        save_steps=0,
        resolution=image_side(pipe),
    )
    trainer = SoftAlignTrainer(pipe, config, data)
    trainer.train()
    print(f"adapter: {trainer.save_model()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
