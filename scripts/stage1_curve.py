"""Stage-1 training curves: train soft tokens (or a LoRA) with one objective and score held-out tags every N steps.

    python scripts/stage1_curve.py --model models/shapes-sd15 --objective agsm --out runs/curve-agsm-sd15
    python scripts/stage1_curve.py --model models/shapes-sd15 --objective softrepa --out runs/curve-softrepa-sd15
    python scripts/stage1_curve.py --model models/shapes-sd15 --objective diffusion --train-lora --out runs/curve-ft
    python scripts/stage1_curve.py --model models/shapes-sd15 --objective agsm --with-lora --out runs/curve-agsm-lora

Resumable at every level: re-running the same command continues the training from its last checkpoint (one every
`--save-every` steps, so a killed run repeats at most that many; bit-identical to an uninterrupted run: one schedule
over `--max-steps`, stopped at each evaluation point) and skips every
evaluation already written. Each evaluation point `k` leaves `OUT/adapters/step-<k>/` (`adapter/`, `lora/<name>/`) and
`OUT/eval/step-<k>/` (GenEval's `results.jsonl`, `summary.json`, `report.md`, `grid.png`; the same prompts and seeds
at every point, so neighbouring points can be compared with `softalign compare`). `OUT/curve.json` and
`OUT/curve.png` hold accuracy and the over-count rate per tag against steps, from step 0 (the base model, scored
once into `OUT/eval/step-000000`). Every run directory is keyed: an evaluation whose `run.json` names another model,
adapter or sampler is refused, never overwritten.

Data: the curated post-training set (clean captions of the training split, `softalign.shapes.pairs.shapes_pairs`),
groups of 1 positive and `--negatives` negatives; the family's paper defaults for everything not given here.

EMA: AGSM scores candidates with EMA tokens. The papers' 0.9999 averages over about 10,000 steps, so in a 5,000-step
run the EMA tokens would have moved only 1 - 0.9999^5000 = 39% of the way from their start; 0.999 (a 1,000-step
horizon) keeps the scorer a smoothed copy of the current tokens, which is what the decay is for in a long run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-sd15")
    parser.add_argument("--objective", default="agsm", choices=["agsm", "softrepa", "diffusion"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument(
        "--save-every",
        type=int,
        help="Training checkpoint every N steps, so that a killed run loses at most N steps; must divide "
        "--eval-every (default: 100 when it does, else --eval-every).",
    )
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=3, help="Negatives per positive (the papers: 3).")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999, help="AGSM's EMA tokens (see the docstring).")
    parser.add_argument("--train-lora", action="store_true", help="Train a LoRA instead of soft tokens.")
    parser.add_argument(
        "--with-lora",
        action="store_true",
        help="Train a LoRA beside the soft tokens, one optimiser for both (AGSM: the two-adapter mode, psi+/psi- "
        "tokens and LoRAs; the matched pair draws).",
    )
    parser.add_argument("--lora-rank", type=int, default=4, help="With --train-lora / --with-lora: the LoRA's rank.")
    parser.add_argument("--n-tokens", type=int, help="Soft tokens per bank (default: the family's, 4).")
    parser.add_argument(
        "--unet-blocks", help="UNet block groups that see the tokens, e.g. down,mid,up (default: the objective's)."
    )
    parser.add_argument(
        "--count-groups",
        type=float,
        default=0.0,
        help="Share of groups that are one class at different counts (hard counting negatives); 0: tag-uniform.",
    )
    parser.add_argument("--images", type=int, default=4096, help="Renders in the curated set.")
    parser.add_argument("--resolution", type=int, default=64, help="Training resolution (the shapes models' side).")
    parser.add_argument("--tags", default="counting,colors,two_object")
    parser.add_argument("--images-per-tag", type=int, default=150)
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=20, help="Sampler steps of the evaluation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.train_lora and args.with_lora:
        parser.error("--train-lora trains a LoRA instead of the tokens, --with-lora beside them: pick one")
    if args.save_every is None:
        args.save_every = 100 if args.eval_every % 100 == 0 else args.eval_every
    if args.save_every <= 0 or args.eval_every % args.save_every:
        parser.error(f"--save-every {args.save_every} must be positive and divide --eval-every {args.eval_every}")
    return args


class StopAt:
    """Stops a trainer at `step` (the schedule stays the one of the whole run)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, logs):
        if logs["step"] >= self.step:
            trainer.should_stop = True


def sha256_of(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def plan_for(tags: list[str], per_tag: int) -> list[tuple[dict, int]]:
    from softalign.shapes.prompts import split_prompts

    plan = []
    for tag in tags:
        lines = [line for line in split_prompts("heldout") if line["tag"] == tag]
        plan += [(line, -(-per_tag // len(lines))) for line in lines]
    return plan


def evaluate(pipe, args, out: Path, key: dict) -> dict:
    """Score the pipeline as it is (tokens attached) into `out`, or read the summary already there."""
    from softalign.eval.run import run_evaluation
    from softalign.shapes.detector import ShapesDetector

    if (out / "summary.json").is_file():
        written = json.loads((out / "run.json").read_text()).get("key")
        if written != key:
            raise FileExistsError(f"{out} holds an evaluation of {written}, not {key}; refusing to overwrite it.")
        return json.loads((out / "summary.json").read_text())
    summary = run_evaluation(
        pipe,
        plan_for(args.tags.split(","), args.images_per_tag),
        ShapesDetector.load(),
        out,
        seed=args.eval_seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        title=f"{args.objective} step {key['step']}" if key["step"] else "base (step 0)",
        progress=False,
    )
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "key": key}, indent=2) + "\n")
    return summary


def point_of(out: Path, step: int) -> dict:
    from softalign.eval.report import counting_confusion
    from softalign.eval.summary import read_results_jsonl

    rows = read_results_jsonl(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    point = {"step": step, **{tag: stats["accuracy"] for tag, stats in summary["tags"].items()}}
    if any(row["tag"] == "counting" for row in rows):
        point["over_count_rate"] = counting_confusion(rows)["over_count_rate"]
    return point


def main(argv=None) -> int:
    from softalign import SoftAlignConfig, SoftAlignTrainer
    from softalign.atomic import atomic_directory
    from softalign.curves import plot_curves
    from softalign.loaders import load_pipeline, lora_config
    from softalign.shapes.pairs import shapes_pairs

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = shapes_pairs(args.images, args.seed, args.count_groups, group=args.negatives + 1)
    sampler = f"ddim {args.steps} steps, cfg {args.guidance_scale}"
    # Step 0 is the base model on the same plan: every curve starts from it, and `softalign compare` pairs it with
    # any later point.
    base_key = {"model": str(args.model), "adapter": None, "step": 0, "seed": args.eval_seed, "sampler": sampler}
    base_dir = out / "eval" / "step-000000"
    evaluate(None if (base_dir / "summary.json").is_file() else load_pipeline(args.model), args, base_dir, base_key)
    points = [point_of(base_dir, 0)]
    for target in range(args.eval_every, args.max_steps + 1, args.eval_every):
        saved = out / "adapters" / f"step-{target:06d}"  # adapter/ (tokens) and lora/<name>/
        pipe = None
        if not saved.is_dir():
            pipe = load_pipeline(args.model)
            config = SoftAlignConfig(
                output_dir=str(out / "train"),
                objective=args.objective,
                max_steps=args.max_steps,
                resolution=args.resolution,
                train_batch_size=args.train_batch_size,
                negatives_per_positive=args.negatives,
                learning_rate=args.learning_rate,
                ema_decay=args.ema_decay,
                save_steps=args.save_every,  # a checkpoint at every evaluation point too (it divides them)
                logging_steps=25,
                resume_from_checkpoint="latest",
                seed=args.seed,
                cache_dir=str(out / "cache"),
                keep_groups=args.count_groups > 0,  # a count group's negatives are its own other counts
            )
            peft = lora_config(args.lora_rank) if args.train_lora or args.with_lora else None
            trainer = SoftAlignTrainer(
                pipe, config, data, soft_tokens=tokens_for(pipe, args), peft_config=peft, callbacks=[StopAt(target)]
            )
            trainer.train()
            if trainer.state.global_step != target:
                raise RuntimeError(f"training stopped at step {trainer.state.global_step}, expected {target}")
            with atomic_directory(saved) as staging:
                trainer.save_model(staging / "adapter")
            pipe = None  # scored below from the saved files, as a user would load them
        eval_dir = out / "eval" / f"step-{target:06d}"
        if not (eval_dir / "summary.json").is_file():
            pipe = load_pipeline(args.model)
            load_trained(pipe, saved)
        key = {
            "model": str(args.model),
            "adapter": sha256_of(saved),
            "step": target,
            "seed": args.eval_seed,
            "sampler": sampler,
        }
        evaluate(pipe, args, eval_dir, key)
        points.append(point_of(eval_dir, target))
        (out / "curve.json").write_text(json.dumps({"args": vars(args), "points": points}, indent=2) + "\n")
        curves = {
            name: [{"step": p["step"], "value": p[name]} for p in points if p.get(name) is not None]
            for name in (*args.tags.split(","), "over_count_rate")
        }
        plot_curves(curves, out / "curve.png")
        print(json.dumps(points[-1]), flush=True)
    return 0


def tokens_for(pipe, args):
    """Soft tokens of another capacity or placement than the family's (`--n-tokens`, `--unet-blocks`), or the
    family's own with `--with-lora` (given a LoRA config, the trainer makes no tokens itself), else None (the trainer
    then makes the family's own, as it always has)."""
    from softalign import SoftTokens

    if args.train_lora or (args.n_tokens is None and args.unet_blocks is None and not args.with_lora):
        return None
    overrides = {"n_tokens": args.n_tokens} if args.n_tokens is not None else {}
    if args.unet_blocks is not None:
        overrides["unet_blocks"] = args.unet_blocks.split(",")
    torch.manual_seed(args.seed)  # the trainer seeds its own tokens the same way
    return SoftTokens.for_pipeline(pipe, objective=args.objective, **overrides)


def load_trained(pipe, saved: Path) -> None:
    """Attach what a curve point saved: its psi+ tokens and, for LoRA runs, the matched-pair adapter."""
    from softalign.loaders import load_lora, load_soft_tokens

    if (saved / "adapter" / "adapter_config.json").is_file():
        load_soft_tokens(pipe, saved / "adapter")
    names = sorted(p.name for p in (saved / "lora").iterdir()) if (saved / "lora").is_dir() else []
    for name in ("softalign_pos", "softalign"):  # AGSM's two adapters: the matched one draws
        if name in names:
            load_lora(pipe, saved / "lora" / name, adapter_name=name)
            break


if __name__ == "__main__":
    raise SystemExit(main())
