"""`softalign` command line: `softalign train ...`, `softalign convert ...` (also `python -m softalign ...`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .loaders import load_pipeline  # noqa: F401 (its old home; import it from softalign)

# transformers warns, once per class, that image processors fall back to PIL without torchvision; softalign loads no
# image processor (the pipelines' feature extractors are unused), so the CLI keeps these lines out of its output.
_OPTIONAL_BACKEND_NOTICE = "requires torchvision (not installed)"


class _DropOptionalBackendNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _OPTIONAL_BACKEND_NOTICE not in record.getMessage()


def quiet_optional_backends() -> None:
    """Drop transformers' "requires torchvision" notices (idempotent)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropOptionalBackendNotices) for f in logger.filters):
        logger.addFilter(_DropOptionalBackendNotices())


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_official_tokens
    from .loaders import save_soft_tokens

    soft_tokens = convert_official_tokens(
        args.src, format=args.format, family=args.family, unet_blocks=args.unet_blocks
    )
    out = save_soft_tokens(soft_tokens, args.out)
    config = soft_tokens.config
    print(
        f"Wrote {out}: {args.format} tokens for {config.family} ({config.architecture}), "
        f"{config.n_banks} bank(s) x {config.n_tokens} tokens x {config.dim}, "
        f"timestep embedding {'on' if config.timestep_embedding else 'off'}."
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .cli_args import build_config
    from .loaders import lora_config
    from .soft_tokens import SoftTokens
    from .softalign_config import SoftAlignConfig
    from .softalign_trainer import SoftAlignTrainer

    config = build_config(SoftAlignConfig, args, args.config)
    pipe = load_pipeline(args.model)
    soft_tokens = SoftTokens.from_pretrained(args.soft_tokens) if args.soft_tokens else None
    peft_config = lora_config(args.lora_rank) if args.lora_rank else None
    trainer = SoftAlignTrainer(pipe, config, args.data, soft_tokens=soft_tokens, peft_config=peft_config)
    trainer.train()
    path = trainer.save_model()
    if trainer.accelerator.is_main_process:
        print(f"Saved the adapter to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .eval.real_cli import run_real_eval, wants_real_eval

    if wants_real_eval(args):  # real models: GenEval's COCO metadata, local detector / CLIP / reward weights
        return run_real_eval(args, load_pipeline)
    if not args.model:
        raise ValueError("--model is required (a local diffusers pipeline directory)")

    from .eval.metadata import load_metadata
    from .eval.run import run_evaluation
    from .eval.summary import format_summary
    from .loaders import load_adapters
    from .shapes.detector import ShapesDetector
    from .shapes.prompts import evaluation_metadata

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    load_adapters(pipe, args.soft_tokens, args.lora)
    if args.metadata:
        plan = [(line, args.images_per_prompt or 4) for line in load_metadata(args.metadata)]
    elif args.images_per_prompt:
        plan = [(line, args.images_per_prompt) for line, _ in evaluation_metadata(args.split)]
    else:
        plan = evaluation_metadata(args.split, min_images_per_tag=args.min_images_per_tag)
    if args.tags:
        wanted = set(args.tags.split(","))
        plan = [(line, n) for line, n in plan if line["tag"] in wanted]
        if not plan:
            raise SystemExit(f"--tags {args.tags}: no metadata line has these tags.")
    summary = run_evaluation(
        pipe,
        plan,
        ShapesDetector.load(),
        args.out,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        batch_size=args.batch_size,
        title=f"GenEval rules: {args.model}",
        overwrite=args.overwrite,
    )
    print(format_summary(summary))
    return 0


def run_names(runs: list[str]) -> list[str]:
    """Column names for run directories: the folder's name, or as much of its path as tells it from the others.

    Curves write `.../eval/step-001000` for every run, so two curves' points share a folder name; keying the table by
    it would silently drop one of them.
    """
    from pathlib import Path

    parts = [Path(run).resolve().parts for run in runs]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"compare: the same run directory is given twice: {runs}")


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval.paired import paired_tests
    from .eval.report import compare
    from .eval.summary import read_results_jsonl

    names = run_names(args.runs)
    summaries = {}
    for name, run in zip(names, args.runs, strict=True):
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run} has no summary.json (expected a `softalign eval` output directory).")
        summaries[name] = json.loads(path.read_text())
    paired = previous = None
    if all((Path(run) / "results.jsonl").is_file() for run in args.runs):
        seeds = {
            json.loads((Path(run) / "run.json").read_text()).get("seed")
            for run in args.runs
            if (Path(run) / "run.json").is_file()
        }
        if len(seeds) > 1:
            print(f"not paired: the runs used different seeds {sorted(map(str, seeds))}; showing intervals only")
        else:
            rows = [read_results_jsonl(Path(run) / "results.jsonl") for run in args.runs]
            paired = {name: paired_tests(rows[0], run_rows) for name, run_rows in zip(names[1:], rows[1:], strict=True)}
            if args.previous:
                previous = {
                    name: paired_tests(before, after)
                    for name, before, after in zip(names[2:], rows[1:-1], rows[2:], strict=True)
                }
    elif args.previous:
        print(
            "--previous: every run needs results.jsonl (per-image verdicts) for a paired test; showing intervals only"
        )
    table = compare(summaries, paired, previous)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `softalign train | eval | compare | convert`."""
    parser = argparse.ArgumentParser(prog="softalign", description="Soft-token alignment for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    from .families import FAMILIES

    convert = commands.add_parser(
        "convert", help="Convert released SoftREPA / AGSM .pth tokens into a softalign adapter directory."
    )
    convert.add_argument("src", help="Directory with the .pth files (or the token file itself).")
    convert.add_argument("out", help="Adapter directory to write.")
    convert.add_argument("--format", required=True, choices=["softrepa", "agsm"], help="Which paper's release.")
    convert.add_argument("--family", choices=FAMILIES, help="Model family (default: inferred).")
    convert.add_argument(
        "--unet-blocks", nargs="+", choices=["down", "mid", "up"], help="UNet block groups the tokens were trained on."
    )
    convert.set_defaults(handler=_convert)

    from .cli_args import add_dataclass_flags
    from .softalign_config import SoftAlignConfig

    train = commands.add_parser("train", help="Train soft tokens (and/or a LoRA) with AGSM or SoftREPA.")
    train.add_argument("--config", help="YAML file of SoftAlignConfig fields (flags override it).")
    train.add_argument("--model", required=True, help="Local diffusers pipeline directory (SD1.x, SDXL or SD3).")
    train.add_argument("--data", required=True, help="Image folder with metadata.jsonl (file_name, text).")
    train.add_argument("--soft-tokens", help="Start from this soft-token adapter directory.")
    train.add_argument("--lora-rank", type=int, default=0, help="Also train a LoRA of this rank on the denoiser.")
    add_dataclass_flags(train, SoftAlignConfig)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="Generate and score images with GenEval's rules (shapes world).")
    evaluate.add_argument("--model", help="Local diffusers pipeline directory (not needed with --images).")
    evaluate.add_argument("--soft-tokens", help="Soft-token adapter directory to load first.")
    evaluate.add_argument("--lora", help="A LoRA directory a softalign trainer wrote (`<run>/lora/<name>/`).")
    evaluate.add_argument("--metadata", help="GenEval metadata .jsonl (default: the shapes world's split).")
    evaluate.add_argument("--split", default="heldout", choices=["heldout", "train"], help="Shapes-world split.")
    evaluate.add_argument("--tags", help="Comma-separated tags to keep, e.g. counting (default: every tag).")
    evaluate.add_argument("--images-per-prompt", type=int, default=0, help="Images per prompt (default: 300 per tag).")
    evaluate.add_argument("--min-images-per-tag", type=int, default=300, help="Images per tag when not per prompt.")
    evaluate.add_argument("--seed", type=int, default=42)
    evaluate.add_argument("--steps", type=int, default=20, help="Sampler steps.")
    evaluate.add_argument("--guidance-scale", type=float, default=7.5)
    evaluate.add_argument(
        "--eta", type=float, help="DDIM eta (pipelines with a DDIM scheduler; default 0); 1.0 is DDPO's sampler."
    )
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--out", required=True, help="Run directory to write.")
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an evaluation of other weights or settings already in --out (refused otherwise).",
    )
    from .eval.real_cli import add_real_eval_args

    add_real_eval_args(evaluate)
    evaluate.set_defaults(handler=_eval)

    comparison = commands.add_parser("compare", help="Put `softalign eval` runs side by side.")
    comparison.add_argument("runs", nargs="+", help="Run directories; the first is the baseline.")
    comparison.add_argument("--out", help="Also write the Markdown table here.")
    comparison.add_argument(
        "--previous",
        action="store_true",
        help="Also test each run against the one before it (rows that build on each other: base, stage 1, stage 2).",
    )
    comparison.set_defaults(handler=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `softalign` command with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    quiet_optional_backends()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"softalign {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
