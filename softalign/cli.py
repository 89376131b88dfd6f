"""`softalign` command line: `softalign convert ...` (more subcommands join as the toolkit grows)."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"softalign {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
