"""The `medmoe` command. Each sub-command lives in its own module here and defines
`register(subparsers)`, which adds its parser and sets `func(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import MedMoEError, is_out_of_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmoe", description="Med-MoE: medical vision-language models with domain experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


# What to change when a command runs out of memory (nothing finished is lost: see each command).
OUT_OF_MEMORY_FIX = {
    "train": "lower phaseN.batch_size (raise phaseN.grad_accum to keep the global batch) or set "
             "phaseN.grad_checkpointing=activations (no slower; saves less), selective or full (saves the most), "
             "then rerun with --resume: finished steps are kept",
    "finetune": "lower --batch-size (add grad_accum=N to keep the global batch) or add grad_checkpointing=full, "
                "then rerun with --resume: finished steps are kept",
    "eval": "lower --batch-size and rerun the same command: finished questions are kept",
    "serve": "lower --max-batch or --max-prompt-tokens, or use --device cpu",
    "bench": "lower --train-batch or --tokens, or leave out the section that failed (--what)",
}


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
    except OSError as err:
        if err.filename is None:  # not a file the user named: a bug or the system's, keep the traceback
            raise
        print(f"medmoe {args.command}: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        if not (isinstance(err, MemoryError) or is_out_of_memory(err)):
            raise
        fix = OUT_OF_MEMORY_FIX.get(args.command, "use a smaller --max-new-tokens, or --device cpu")
        what = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"medmoe {args.command}: error: out of memory ({what}); {fix}", file=sys.stderr)
        return 3
    return int(code or 0)
