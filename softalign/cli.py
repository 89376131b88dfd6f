"""`softalign` command line: `softalign train ...`, `softalign convert ...` (also `python -m softalign ...`)."""

from __future__ import annotations

import argparse
import json
import sys


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


def load_pipeline(path: str):
    """A diffusers pipeline from a local directory (never downloads)."""
    from pathlib import Path

    from diffusers import DiffusionPipeline

    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json).")
    # components saved as null (e.g. an SD3 pipeline without T5): diffusers wants them passed as None explicitly
    absent = {k: None for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[:1] == [None]}
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train(args: argparse.Namespace) -> int:
    from .cli_args import build_config
    from .config import SoftAlignConfig
    from .loaders import read_soft_tokens
    from .trainer import SoftAlignTrainer

    config = build_config(SoftAlignConfig, args, args.config)
    pipe = load_pipeline(args.model)
    soft_tokens = read_soft_tokens(args.soft_tokens) if args.soft_tokens else None
    peft_config = None
    if args.lora_rank:
        from peft import LoraConfig

        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=targets)
    trainer = SoftAlignTrainer(pipe, config, args.data, soft_tokens=soft_tokens, peft_config=peft_config)
    trainer.train()
    path = trainer.save_model()
    if trainer.accelerator.is_main_process:
        print(f"Saved the adapter to {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .eval.metadata import load_metadata
    from .eval.run import run_evaluation
    from .eval.summary import format_summary
    from .loaders import load_lora, load_soft_tokens
    from .shapes.detector import ShapesDetector
    from .shapes.prompts import evaluation_metadata

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    if args.soft_tokens:
        load_soft_tokens(pipe, args.soft_tokens)
    if args.lora:
        load_lora(pipe, args.lora)
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
    )
    print(format_summary(summary))
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .eval.report import compare

    summaries = {}
    for run in args.runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run} has no summary.json (expected a `softalign eval` output directory).")
        summaries[Path(run).name] = json.loads(path.read_text())
    table = compare(summaries)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    from .config import SoftAlignConfig

    train = commands.add_parser("train", help="Train soft tokens (and/or a LoRA) with AGSM or SoftREPA.")
    train.add_argument("--config", help="YAML file of SoftAlignConfig fields (flags override it).")
    train.add_argument("--model", required=True, help="Local diffusers pipeline directory (SD1.x, SDXL or SD3).")
    train.add_argument("--data", required=True, help="Image folder with metadata.jsonl (file_name, text).")
    train.add_argument("--soft-tokens", help="Start from this soft-token adapter directory.")
    train.add_argument("--lora-rank", type=int, default=0, help="Also train a LoRA of this rank on the denoiser.")
    add_dataclass_flags(train, SoftAlignConfig)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="Generate and score images with GenEval's rules (shapes world).")
    evaluate.add_argument("--model", required=True, help="Local diffusers pipeline directory.")
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
    evaluate.set_defaults(handler=_eval)

    comparison = commands.add_parser("compare", help="Put `softalign eval` runs side by side.")
    comparison.add_argument("runs", nargs="+", help="Run directories; the first is the baseline.")
    comparison.add_argument("--out", help="Also write the Markdown table here.")
    comparison.set_defaults(handler=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"softalign {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
