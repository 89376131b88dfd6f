"""Command-line flags generated from a config dataclass: `--field value`, after an optional YAML `--config FILE`.

Values given on the command line override the file; every value is validated by the dataclass itself.
"""

from __future__ import annotations

import argparse
import dataclasses


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(annotation: str):
    base = annotation.replace(" ", "").removesuffix("|None")
    optional = annotation.replace(" ", "").endswith("|None")
    convert = {"int": int, "float": float, "bool": _parse_bool}.get(base, str)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return convert(text)

    return parse


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--name` flag per field (default: not given), with the field's help text."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if str(f.type).startswith("list"):
            parser.add_argument(flag, dest=f.name, nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                flag, dest=f.name, type=_converter(str(f.type)), default=argparse.SUPPRESS, help=help_text
            )


def build_config(cls, args: argparse.Namespace, config_file: str | None):
    """The dataclass from the YAML file (if any) updated with the flags that were given."""
    from .training import read_config_file

    data = read_config_file(config_file, cls.__name__) if config_file else {}
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(data, source=config_file or "command line")
