"""`softalign` command line: `softalign train ...`, `softalign convert ...` (also `python -m softalign ...`)."""

from __future__ import annotations

import argparse
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

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json).")
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softalign", description="Soft-token alignment for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="Convert released SoftREPA / AGSM .pth tokens into a softalign adapter directory."
    )
    convert.add_argument("src", help="Directory with the .pth files (or the token file itself).")
    convert.add_argument("out", help="Adapter directory to write.")
    convert.add_argument("--format", required=True, choices=["softrepa", "agsm"], help="Which paper's release.")
    convert.add_argument("--family", choices=["sd15", "sd2", "sdxl", "sd3"], help="Model family (default: inferred).")
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
