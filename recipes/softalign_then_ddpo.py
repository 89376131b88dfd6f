"""The flagship recipe: reward-free AGSM soft tokens, then DDPO with a GenEval-rule reward on the same tokens.

    python recipes/softalign_then_ddpo.py                                  # shipped shapes model, offline, CPU
    python recipes/softalign_then_ddpo.py --objective softrepa --out runs/flagship-softrepa
    python recipes/softalign_then_ddpo.py --stage2 diffusion_dpo --alongside 0.5 --no-train-lora
    python recipes/softalign_then_ddpo.py --model path/to/sd15 --data data/coco-train --stage2 none
    accelerate launch --num_processes 2 recipes/softalign_then_ddpo.py --stage1-steps 200
    python recipes/softalign_then_ddpo.py --full --out runs/full-sd15      # the README's whole table (recipes/full_table.py)

Stages: evaluate the base model on the held-out shapes split; stage 1, SoftAlign (AGSM by default) on shapes-world
image-caption pairs (or `--data`); evaluate; stage 2, DDPO with the GenEval-rule reward (or Diffusion-DPO, or
nothing) on the same soft tokens and a rank-4 LoRA (`--no-train-lora`: tokens only); evaluate. A model that ships a
stage-1 adapter (`<model>/adapters/<objective>/`) starts stage 2 from it instead of training stage 1, unless
`--stage1-steps` or `--data` is given: the demo's few hundred token steps do not move counting. The report directory
holds `report.md` (per-tag table with changes), `report.json`, the verdict grids of every evaluation (same prompts
and seeds), `curves.png`, and the adapters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGE1_STEPS = 300  # the demo's stage-1 budget when it trains stage 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of these options (flags override it).")
    parser.add_argument("--model", default=str(ROOT / "models" / "shapes-sd15"), help="Local pipeline directory.")
    parser.add_argument("--data", help="Image-caption folder (metadata.jsonl) for stage 1; default: shapes renders.")
    parser.add_argument("--out", help="Report directory (default: runs/flagship; with --full, runs/full-sd15).")
    parser.add_argument(
        "--full",
        action="store_true",
        help="Run the README's whole table instead (recipes/full_table.py: every row trained, resumable, hours); "
        "only --out and --full-config apply.",
    )
    parser.add_argument(
        "--full-config", help="With --full: the budgets (default: recipes/configs/full_table/sd15.yaml)."
    )
    parser.add_argument("--objective", default="agsm", choices=["agsm", "softrepa"])
    parser.add_argument("--stage2", default="ddpo", choices=["ddpo", "diffusion_dpo", "none"])
    parser.add_argument("--alongside", type=float, default=0.0, help="Weight of the stage-1 objective in stage 2.")
    parser.add_argument(
        "--train-lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Stage 2 also trains a LoRA (rank 4) beside the tokens; DDPO on the 4 tokens alone barely moves counting.",
    )
    parser.add_argument(
        "--stage1-steps",
        type=int,
        help=f"Train stage 1 for this many steps (default {STAGE1_STEPS}; giving it trains even when the model ships "
        "a stage-1 adapter).",
    )
    parser.add_argument(
        "--stage1-from",
        help="A soft-token adapter directory to start stage 2 from instead of training stage 1; it is evaluated as "
        "the stage-1 row. Default: the model's shipped adapter for --objective (<model>/adapters/<objective>/) when "
        "it has one and neither --stage1-steps nor --data is given, else stage 1 is trained.",
    )
    parser.add_argument("--stage1-images", type=int, default=512, help="Shapes renders for stage 1.")
    parser.add_argument(
        "--count-groups",
        type=float,
        default=0.0,
        help="Share of the stage-1 shapes groups that are hard negatives: one class at four counts.",
    )
    parser.add_argument("--stage2-epochs", type=int, default=16)
    parser.add_argument(
        "--eval-images-per-prompt", type=int, help="Images for every held-out prompt (instead of a per-tag budget)."
    )
    parser.add_argument(
        "--eval-images-per-tag",
        type=int,
        default=48,
        help="At least this many images per tag (a fixed subset of color_attr's 270 prompts); the default keeps each "
        "of the three evaluations near 300 images on the v2 world's 339 held-out prompts.",
    )
    parser.add_argument(
        "--stage2-tags",
        help="Comma-separated shapes tags stage 2 samples training-split prompts from (default: counting when stage 1 "
        "starts from the model's shipped adapter, as in `make demo`; all tags otherwise).",
    )
    parser.add_argument("--stage2-lr", type=float, default=3e-3, help="DDPO learning rate.")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument(
        "--guidance-scale", type=float, default=1.5, help="CFG of every evaluation and of DDPO sampling (shapes: 1.5)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-base-eval", action="store_true", help="Reuse <out>/eval-base if present.")
    args = parser.parse_args(argv)
    if args.full:
        return args
    args.out = args.out or "runs/flagship"
    args.softalign_overrides, args.stage2_overrides = {}, {}
    if args.config:
        from softalign.training import read_config_file

        data = read_config_file(args.config, "recipe")
        # nested mappings override the trainers' configs (SoftAlignConfig / DDPOConfig or DiffusionDPOConfig)
        args.softalign_overrides = data.pop("softalign", {}) or {}
        args.stage2_overrides = data.pop("stage2_config", {}) or {}
        unknown = sorted(set(data) - set(vars(args)))
        if unknown:
            raise SystemExit(f"{args.config}: unknown options {unknown}")
        defaults = parser.parse_args([])
        for key, value in data.items():
            if getattr(args, key) == getattr(defaults, key):  # the command line wins
                setattr(args, key, value)
    shipped = Path(args.model) / "adapters" / args.objective  # the model's own stage-1 adapter, if it ships one
    args.stage1_shipped = args.stage1_from is None and args.stage1_steps is None and not args.data
    args.stage1_shipped = args.stage1_shipped and (shipped / "adapter_config.json").is_file()
    if args.stage1_shipped:
        args.stage1_from = str(shipped)
        # The demo's RL stage aims at the headline tag: tag-uniform DDPO's reward stayed flat for 25 epochs on
        # shapes-sd15 v3, DDPO on the training split's counting prompts moved held-out counting (the README).
        args.stage2_tags = args.stage2_tags or "counting"
    args.stage1_steps = STAGE1_STEPS if args.stage1_steps is None else args.stage1_steps
    if args.stage2_tags:
        from softalign.shapes.prompts import parse_tags

        try:
            parse_tags(args.stage2_tags)  # args stay plain strings: report.json records them
        except ValueError as error:
            parser.error(f"--stage2-tags: {error}")
    return args


def stage1_note(args) -> str:
    note = f"Stage 1 was not trained here: its tokens are `{args.stage1_from}`"
    if args.stage1_shipped:
        note += (
            ", the adapter the model ships (its card says how it was trained). At the demo's budget (300 steps) AGSM "
            "tokens do not move counting, and the shipped adapter is the best point of a 5000-step curve, so the demo "
            "starts from it and trains only stage 2, on the training split's "
            f"{args.stage2_tags} prompts; `--stage1-steps N` trains stage 1 here instead"
        )
    return note + "."


def evaluate(pipe, args, name: str, detector) -> dict:
    from softalign.eval.run import run_evaluation
    from softalign.shapes.prompts import evaluation_metadata

    if args.eval_images_per_prompt:
        plan = [(line, args.eval_images_per_prompt) for line, _ in evaluation_metadata("heldout")]
    else:
        plan = evaluation_metadata("heldout", min_images_per_tag=args.eval_images_per_tag)
    out = Path(args.out) / f"eval-{name}"
    print(f"\n== evaluating {name}: {sum(n for _, n in plan)} images on the held-out split", flush=True)
    return run_evaluation(
        pipe,
        plan,
        detector,
        out,
        seed=1234,
        num_inference_steps=args.sample_steps,
        guidance_scale=args.guidance_scale,
        title=f"{name}: GenEval rules, held-out shapes",
    )


def paired_tests_between(out: Path, first: str, second: str) -> dict:
    """McNemar's exact test per tag between two of this run's evaluations (same prompts and seeds by construction)."""
    from softalign.eval.paired import paired_tests
    from softalign.eval.summary import read_results_jsonl

    rows = [read_results_jsonl(out / f"eval-{name}" / "results.jsonl") for name in (first, second)]
    return paired_tests(*rows)


def paired_against_base(out: Path, summaries: dict) -> dict:
    """Every later stage against the base, for the report's p column."""
    names = list(summaries)
    return {name: paired_tests_between(out, names[0], name) for name in names[1:]}


def neighbour_lines(out: Path, summaries: dict) -> list[str]:
    """Stage 2 against stage 1 (what the RL stage adds on top of the tokens), one line per tag."""
    if not {"stage1", "stage2"} <= summaries.keys():
        return []
    tests = paired_tests_between(out, "stage1", "stage2")
    cells = [
        f"{tag} {100 * test['delta']:+.1f} pts, p = {test['p']:.3g} ({test['only_a']}/{test['only_b']})"
        for tag, test in tests.items()
    ]
    return ["Stage 2 against stage 1 (McNemar, right only in stage 1 / only in stage 2): " + "; ".join(cells), ""]


def configured(config_class, overrides: dict, section: str, **defaults):
    """`config_class(**defaults)` with the `--config` file's `section` mapping on top (the file wins over the
    recipe's small-budget defaults; its top-level options were already merged with the command line)."""
    try:
        return config_class(**{**defaults, **overrides})
    except TypeError as error:
        raise SystemExit(f"--config: the '{section}' section does not fit {config_class.__name__}: {error}") from None


def stage2(pipe, args, tokens, stage1_trainer, detector):
    from softalign import lora_config
    from softalign.rl import DDPOConfig, DDPOTrainer, DiffusionDPOConfig, DiffusionDPOTrainer, GenEvalReward
    from softalign.shapes.data import prompt_sampler
    from softalign.shapes.pairs import preference_pairs
    from softalign.shapes.prompts import parse_tags, split_prompts

    lines = split_prompts("train")
    if args.stage2_tags:
        wanted = parse_tags(args.stage2_tags)
        lines = [line for line in lines if line["tag"] in wanted]
    peft = lora_config(4) if args.train_lora else None
    out = Path(args.out) / "stage2"
    if args.stage2 == "ddpo":
        prompt_fn = prompt_sampler(lines, seed=args.seed)
        config = configured(
            DDPOConfig,
            args.stage2_overrides,
            "stage2_config",
            output_dir=str(out),
            num_epochs=args.stage2_epochs,
            sample_num_steps=args.sample_steps,
            sample_batch_size=16,
            sample_num_batches_per_epoch=2,
            train_batch_size=4,
            sample_guidance_scale=args.guidance_scale,
            train_learning_rate=args.stage2_lr,
            train_timestep_fraction=0.5,
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_min_count=8,
            seed=args.seed,
            alongside_weight=args.alongside,
        )
        trainer = DDPOTrainer(
            config,
            GenEvalReward(detector, dense=True),
            prompt_fn,
            pipe,
            soft_tokens=tokens,
            peft_config=peft,
            alongside=stage1_trainer if args.alongside else None,
        )
        history = trainer.train().log_history
        return trainer, [{"step": r["epoch"] + 1, "value": r["reward_mean"]} for r in history], "mean dense reward"
    pairs = preference_pairs(pipe, lines, detector, args.seed, args.sample_steps, args.guidance_scale)
    config = configured(
        DiffusionDPOConfig,
        args.stage2_overrides,
        "stage2_config",
        output_dir=str(out),
        max_steps=args.stage2_epochs * 10,
        seed=args.seed,
        logging_steps=1,
        alongside_weight=args.alongside,
    )
    trainer = DiffusionDPOTrainer(
        pipe, config, pairs, soft_tokens=tokens, peft_config=peft, alongside=stage1_trainer if args.alongside else None
    )
    history = trainer.train().log_history
    return trainer, [{"step": r["step"], "value": r["loss"]} for r in history], "DPO loss"


def run_full_table(args) -> int:
    """`--full`: hand over to recipes/full_table.py, which calls this recipe (and the others) per row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("softalign_full_table", ROOT / "recipes" / "full_table.py")
    full_table = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = full_table  # its dataclasses look their module up there
    spec.loader.exec_module(full_table)
    argv = ["--out", args.out or "runs/full-sd15"]
    return full_table.main(argv + (["--config", args.full_config] if args.full_config else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.full:
        return run_full_table(args)
    torch.set_num_threads(args.threads)
    from softalign import SoftAlignConfig, SoftAlignTrainer, SoftTokens, load_pipeline, save_soft_tokens
    from softalign.curves import plot_curves
    from softalign.eval.report import compare
    from softalign.families import image_side
    from softalign.shapes.detector import ShapesDetector
    from softalign.shapes.pairs import shapes_pairs
    from softalign.training import make_accelerator

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Under `accelerate launch` / torchrun the trainers share this process group; the evaluations and the report are
    # the main process's job (the others wait), so no file is written twice. It is made before anything else touches
    # accelerate's state, so that on CPU the gloo group is formed.
    accelerator = make_accelerator("no", str(out))
    pipe = load_pipeline(args.model)
    loaded = SoftTokens.from_pretrained(args.stage1_from) if args.stage1_from else None  # before any evaluation
    detector = ShapesDetector.load()

    def evaluate_once(name: str) -> dict | None:
        summary = evaluate(pipe, args, name, detector) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        return summary

    summaries = {}
    if args.skip_base_eval and (out / "eval-base" / "summary.json").is_file():
        summaries["base"] = json.loads((out / "eval-base" / "summary.json").read_text())
    else:
        summaries["base"] = evaluate_once("base")

    if loaded is None:
        print(f"\n== stage 1: {args.objective} soft tokens, {args.stage1_steps} steps", flush=True)
    else:
        print(f"\n== stage 1: {args.objective} soft tokens loaded from {args.stage1_from} (not trained)", flush=True)
    stage1_config = configured(
        SoftAlignConfig,
        args.softalign_overrides,
        "softalign",
        output_dir=str(out / "stage1"),
        objective=args.objective,
        max_steps=args.stage1_steps,
        seed=args.seed,
        logging_steps=5,
        save_steps=0,
        train_batch_size=8,
        chunk_size=8,
        ema_decay=0.99,
        resolution=image_side(pipe),
        keep_groups=bool(args.count_groups) and not args.data,  # count groups must stay whole
    )
    group = stage1_config.negatives_per_positive + 1
    data = args.data or shapes_pairs(args.stage1_images, args.seed, args.count_groups, group)
    # Loaded tokens still get a stage-1 trainer: it attaches them, and `--alongside` needs its objective.
    stage1 = SoftAlignTrainer(pipe, stage1_config, data, soft_tokens=loaded)
    if loaded is None:
        stage1.train()
    tokens = stage1.soft_tokens
    if accelerator.is_main_process:
        save_soft_tokens(tokens, out / "adapter-stage1")
    summaries["stage1"] = evaluate_once("stage1")
    stage1_loss = [{"step": r["step"], "value": r["loss"]} for r in stage1.state.log_history if "loss" in r]
    curves = {f"stage 1 {args.objective} loss": stage1_loss} if stage1_loss else {}
    if args.stage2 != "none":
        print(f"\n== stage 2: {args.stage2} on the same soft tokens", flush=True)
        trainer, points, label = stage2(pipe, args, tokens, stage1, detector)
        curves[f"stage 2 {label}"] = points
        trainer.save_model(out / "adapter-stage2")  # and <out>/lora/softalign with --train-lora
        summaries["stage2"] = evaluate_once("stage2")
    if not accelerator.is_main_process:
        return 0
    plot_curves(curves, out / "curves.png")
    paired = paired_against_base(out, summaries)
    table = compare(summaries, paired)
    minutes = (time.time() - started) / 60
    if args.eval_images_per_prompt:
        images_per = f"{args.eval_images_per_prompt} images per prompt"
    else:
        images_per = f"at least {args.eval_images_per_tag} images per tag"
    report = [
        f"# softalign flagship: {args.objective} then {args.stage2}"
        + (f", with {args.objective} alongside (weight {args.alongside:g})" if args.alongside else ""),
        "",
        f"Model: `{args.model}`; "
        f"held-out shapes split, {images_per}, seed 1234, "
        f"{args.sample_steps} steps, CFG {args.guidance_scale}; {minutes:.1f} minutes.",
        "",
        *([stage1_note(args), ""] if args.stage1_from else []),
        table,
        "",
        *neighbour_lines(out, summaries),
        "Grids: " + ", ".join(f"`eval-{name}/grid.png`" for name in summaries) + "; curves: `curves.png`.",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {"args": vars(args), "summaries": summaries, "paired": paired, "curves": curves, "minutes": minutes},
            indent=2,
        )
        + "\n"
    )
    for name in summaries:
        grid = out / f"eval-{name}" / "grid.png"
        if grid.is_file():
            shutil.copy(grid, out / f"grid-{name}.png")
    print("\n" + table + f"\n\nReport: {out / 'report.md'} ({minutes:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
