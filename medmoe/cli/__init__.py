"""The `medmoe` command. Each sub-command lives in its own module here and defines
`register(subparsers)`, which adds its parser and sets `func(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import MedMoEError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmoe", description="Med-MoE: medical vision-language models with domain experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except MedMoEError as err:
        print(f"medmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
