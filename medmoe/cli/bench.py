"""`medmoe bench`: speed measurements written as JSON (docs/speed.md explains them).

    medmoe bench --what moe,train,decode --out bench.json      # on a GPU
    medmoe bench --what cpu --threads 2 --out bench-cpu.json   # on the CPU
"""

from __future__ import annotations

import argparse

SECTIONS = ("moe", "decode", "train", "cpu")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure MoE layer, decode, training and CPU speed (JSON)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    p.add_argument("--what", default="moe,train,decode", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", default="bench.json", help="JSON file written after each section")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tokens", default="1,8,256,4096,16384", help="MoE layer token counts")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: new tokens per sequence")
    p.add_argument("--decode-batches", default="1,8", help="decode: batch sizes")
    p.add_argument("--compile", action="store_true", help="decode: also fuse the step with torch.compile")
    p.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="decode: torch.compile's mode for the step (implies --compile), e.g. "
                        "max-autotune-no-cudagraphs (the step is already captured in a CUDA graph)")
    p.add_argument("--no-baselines", action="store_true", help="decode: skip the eager and plain-loop baselines")
    p.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false",
                   help="decode: keep the attention's query, key and value projections separate (model/fused_qkv.py)")
    p.add_argument("--no-fuse-parallel", dest="fuse_parallel", action="store_false",
                   help="decode: fuse only the query, key and value projections, not Phi's FFN projections with them")
    p.add_argument("--no-overlap-experts", dest="overlap_experts", action="store_false",
                   help="decode: run a Med-MoE layer's experts after its attention, not beside it on a second CUDA "
                        "stream (moe/overlap.py)")
    p.add_argument("--no-decode-rotary", dest="decode_rotary", action="store_false",
                   help="decode: rotate and write the cache as transformers' Phi attention does, not in one kernel "
                        "(model/decode_attention.py)")
    p.add_argument("--no-linear-matvec", dest="linear_matvec", action="store_false",
                   help="decode: run the fused products at one row by cuBLAS, not by the matrix-vector kernel "
                        "(moe/kernels.py: linear)")
    p.add_argument("--train-batch", type=int, default=16, help="train: sequences per step (576 image + 64 text tokens)")
    p.add_argument("--checkpoint-every", default="1",
                   help="train: recompute activations in every n-th layer; a comma list measures each (0 or off: none; "
                        "full: every layer; selective: every layer, matrix products kept; activations: no layer, the FFNs' "
                        "activation outputs recomputed)")
    p.add_argument("--threads", type=int, default=2, help="cpu: torch threads")
    p.add_argument("--image", default=None, help="cpu: an image file for the prompt (default: a grey square)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os
    import traceback

    import torch

    from ..errors import ConfigError
    from ..training.recipe import checkpointing_setting
    from ..bench.timing import device_name

    sections = [s.strip() for s in args.what.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"--what {args.what}: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    checkpointing = [int(n) if n.strip().isdigit() else n.strip() for n in args.checkpoint_every.split(",")]
    try:
        for setting in checkpointing:
            checkpointing_setting(setting)
    except ConfigError:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: give layer counts (0: none) or modes "
                          "(off, full, selective, activations), comma-separated, e.g. 1,2,0,selective,activations") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"device": device_name(device), "torch": torch.__version__}
    model = None

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)

    for section in sections:
        try:
            if section == "moe":
                from ..bench import moe_layer

                sizes = tuple(int(t) for t in args.tokens.split(","))
                report["moe_layer"] = moe_layer.run(device, sizes=sizes)
            elif section in ("decode", "train"):
                from ..bench import decode, models, train

                model = model or models.phi2_medmoe(device)
                if section == "decode":
                    batches = tuple(int(b) for b in args.decode_batches.split(","))
                    report["decode"] = decode.run(device, batches, new_tokens=args.new_tokens, model=model,
                                                  compile=args.compile_mode or args.compile,
                                                  baselines=not args.no_baselines, fuse_qkv=args.fuse_qkv,
                                                  fuse_parallel=args.fuse_parallel, linear_matvec=args.linear_matvec,
                                                  overlap_experts=args.overlap_experts,
                                                  decode_rotary=args.decode_rotary)
                else:
                    report["train"] = [train.run(device, batch=args.train_batch, model=model, checkpoint_every=n)
                                       for n in checkpointing]
            else:
                from ..bench import cpu

                report["cpu"] = cpu.run(threads=args.threads, image=args.image)
        except Exception as err:  # one failed section must not lose the others' numbers
            traceback.print_exc()
            report[f"{section}_error"] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    from ..bench.plot import plot_report

    picture = os.path.splitext(args.out)[0] + ".png"
    if plot_report(report, picture):
        print(f"wrote {picture}")
    print(f"wrote {args.out}")
    return 0
