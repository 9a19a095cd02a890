"""`medmoe export`: a trained model as a compact delta on its pretrained base (what ships)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("export", help="save a trained model as a small delta on pretrained base weights")
    p.add_argument("model", help="a trained model folder (e.g. runs/nano/phase3/model)")
    p.add_argument("out", help="output folder")
    p.add_argument("--base", default="nano", help="the preset whose pretrained weights the delta applies to (default nano)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"),
                   help="storage type of the delta tensors (default bfloat16)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..loading import load_model
    from ..model.pretrained import save_delta

    model, processor = load_model(args.model)
    summary = save_delta(model, processor, args.out, base=args.base, dtype=getattr(torch, args.dtype))
    print(json.dumps({"out": args.out, "base": args.base, **summary}, indent=2))
    return 0
