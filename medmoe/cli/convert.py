"""`medmoe convert`: official Med-MoE / MoE-LLaVA checkpoints and routers -> medmoe format (no DeepSpeed)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

SOURCES = ("official-medmoe", "moe-llava", "router-pth")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an official Med-MoE / MoE-LLaVA checkpoint or router file to medmoe format",
        description="Convert the authors' checkpoints so they load without DeepSpeed. SRC is a checkpoint folder "
                    "(config.json + safetensors or pytorch_model*.bin) or, for router-pth, a phi_router.pth / "
                    "stablelm_router.pth file. Pickles are read with weights_only=True only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="what SRC is")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT", help="output folder (router-pth: a .safetensors file or a folder)")
    p.add_argument("--vision-tower", default=None, metavar="PATH",
                   help="local CLIP folder (config.json + weights) to use when the checkpoint has no vision-tower "
                        "weights, or to replace them")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the written LLM and projector weights; auto keeps the checkpoint's")
    p.add_argument("--vision-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the written vision tower; auto keeps the precision its weights come in")
    p.add_argument("--drop-tokens-like-official", action="store_true",
                   help="MoE-LLaVA: drop the tokens DeepSpeed's gate drops at inference (eval_capacity_factor, "
                        "min_capacity), to reproduce the official outputs; by default no token is dropped")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import CheckpointError

    if args.source == "router-pth":
        from ..conversion import convert_router

        path, state = convert_router(args.src, args.out)
        w = state["router.weight"]
        print(f"router: {w.shape[0]} experts x hidden {w.shape[1]} (fc1.weight/fc1.bias -> router.weight/router.bias)")
        print(f"wrote {path}")
        return 0

    import sys

    from ..conversion.official import (as_dtype, attach_tokenizer, build_model, convert_checkpoint, read_config,
                                       report_lines)
    from ..conversion.files import load_folder

    if not os.path.isdir(args.src):
        raise CheckpointError(f"{args.src}: not a folder; --from {args.source} takes a checkpoint folder")
    if os.path.exists(args.out) and not args.overwrite:
        raise CheckpointError(f"{args.out} exists; pass --overwrite to replace it")
    expect = "medmoe" if args.source == "official-medmoe" else "moe-llava"
    conv = convert_checkpoint(read_config(args.src), load_folder(args.src), vision_tower=args.vision_tower, expect=expect,
                              drop_tokens_like_official=args.drop_tokens_like_official)
    model = build_model(conv, as_dtype(args.dtype), as_dtype(args.vision_dtype))
    processor = attach_tokenizer(model, args.src, conv.report)
    # Write next to OUT, then move into place: an interrupted conversion never leaves a half folder.
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    try:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in report_lines(conv.report, model):
        print(line)
    print(f"wrote {args.out}" + ("" if processor is not None else " (no tokenizer: see note above)"))
    for message in conv.report.warnings:
        print(f"warning: {message}", file=sys.stderr)
    return 0
