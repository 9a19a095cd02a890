"""`medmoe bench`: speed measurements written as JSON (docs/speed.md explains them).

    medmoe bench --what moe,train,decode --out bench.json      # on a GPU
    medmoe bench --what cpu --threads 2 --out bench-cpu.json   # on the CPU
    medmoe bench --what serve --model nano --clients 1,8 --out bench-serve/   # the server, streaming clients
    medmoe bench --what soak --clients 64 --seconds 60 --out bench-soak/      # errors and memory under load

serve and soak start the server on 127.0.0.1 (a `medmoe serve` subprocess), drive it with
OpenAI-protocol clients and write serve.json / soak.json and a plot to --out (a folder, or a
.json file name whose stem they extend).
"""

from __future__ import annotations

import argparse

SECTIONS = ("moe", "decode", "train", "cpu", "serve", "soak")
SERVER_SECTIONS = ("serve", "soak")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure MoE layer, decode, training and CPU speed (JSON)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    p.add_argument("--what", default="moe,train,decode", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", default="bench.json", help="JSON file written after each section, or a folder")
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
                   help="decode: keep the attention's query, key and value projections separate (engine/fused_layers.py)")
    p.add_argument("--no-fuse-parallel", dest="fuse_parallel", action="store_false",
                   help="decode: fuse only the query, key and value projections, not Phi's FFN projections with them")
    p.add_argument("--no-overlap-experts", dest="overlap_experts", action="store_false",
                   help="decode: run a Med-MoE layer's experts after its attention, not beside it on a second CUDA "
                        "stream (engine/overlap.py)")
    p.add_argument("--no-decode-rotary", dest="decode_rotary", action="store_false",
                   help="decode: rotate and write the cache as transformers' Phi attention does, not in one kernel "
                        "(engine/decode_attention.py)")
    p.add_argument("--no-linear-matvec", dest="linear_matvec", action="store_false",
                   help="decode: run the fused products at one row by cuBLAS, not by the matrix-vector kernel "
                        "(moe/kernels.py: linear)")
    p.add_argument("--train-batch", type=int, default=16, help="train: sequences per step (576 image + 64 text tokens)")
    p.add_argument("--checkpoint-every", default="1",
                   help="train: recompute activations in every n-th layer; a comma list measures each (0 or off: none; "
                        "full: every layer; selective: every layer, matrix products kept; activations: no layer, the FFNs' "
                        "activation outputs recomputed)")
    p.add_argument("--threads", type=int, default=2, help="cpu: torch threads")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="cpu: the model's dtype (auto: bfloat16 on a CPU with bfloat16 hardware, else float32)")
    p.add_argument("--image", default=None, nargs="?", const="random",
                   help="cpu: an image file for the prompt (default: a grey square); serve: send an image with "
                        "every request, a random-noise PNG or this file")
    p.add_argument("--model", default="nano",
                   help="serve, soak: a model folder, the bundled nano, or a preset with random weights (phi2: the "
                        "Phi-2-size Med-MoE with 576 image tokens; tiny); cpu: the bundled nano or a model folder")
    p.add_argument("--server", default="process", choices=["process", "thread"],
                   help="serve, soak: `medmoe serve` in a subprocess, or the app in a thread of this process")
    p.add_argument("--serve-args", default="", help="serve, soak: more `medmoe serve` options, e.g. '--max-batch 16'")
    p.add_argument("--clients", default=None,
                   help="serve: concurrent clients, a comma list measures each (default 1,8); soak: clients (64)")
    p.add_argument("--requests-per-client", type=int, default=4, help="serve: requests each client sends in turn")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="serve, soak: tokens per answer (EOS ignored; default 64 for serve, 16 for soak)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="serve: text tokens of each question (about)")
    p.add_argument("--seconds", type=float, default=60.0, help="soak: how long clients keep sending")
    p.add_argument("--disconnect-fraction", type=float, default=0.1,
                   help="soak: share of clients that close the stream after the first token")
    p.add_argument("--bad-fraction", type=float, default=0.1, help="soak: share of clients that send bad inputs")
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
    out = args.out if args.out.endswith(".json") else os.path.join(args.out, "bench.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)

    def save(data=report, path=out):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)

    for section in sections:
        if section in SERVER_SECTIONS:  # its own JSON and plot; errors (a server that fails to start) stop the run
            report[section] = serve_section(section, args, device, report, save)
            continue
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

                report["cpu"] = cpu.run(threads=args.threads, image=None if args.image == "random" else args.image,
                                        dtype=args.dtype, model_name=args.model)
        except Exception as err:  # one failed section must not lose the others' numbers
            traceback.print_exc()
            report[f"{section}_error"] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if all(section in SERVER_SECTIONS for section in sections):
        return 0
    from ..bench.plot import plot_report

    picture = os.path.splitext(out)[0] + ".png"
    if plot_report(report, picture):
        print(f"wrote {picture}")
    print(f"wrote {out}")
    return 0


def serve_section(section: str, args, device, report: dict, save) -> str:
    """Run `serve` or `soak` against a server on loopback; write its JSON and plot; the JSON's path."""
    import os
    import shlex

    from ..bench import plot, servers
    from ..errors import ConfigError

    stem = os.path.splitext(args.out)[0] + f"-{section}" if args.out.endswith(".json") else \
        os.path.join(args.out, section)
    try:
        clients = [int(c) for c in (args.clients or ("1,8" if section == "serve" else "64")).split(",")]
    except ValueError:
        raise ConfigError(f"--clients {args.clients}: give client counts, comma-separated, e.g. 1,8") from None
    if min(clients) < 1 or (section == "soak" and len(clients) != 1):
        raise ConfigError(f"--clients {args.clients}: positive counts; soak takes one count")
    result = {"section": section, "model": args.model, "device": report["device"], "server_kind": args.server,
              "serve_args": args.serve_args}
    with servers.served(args.model, str(device), args.server, shlex.split(args.serve_args),
                        log_path=stem + "-server.log" if args.server == "process" else None) as s:
        if section == "serve":
            from ..bench import serve_load

            result.update(serve_load.run(s.base, clients, requests_per_client=args.requests_per_client,
                                         max_tokens=args.max_tokens or 64, prompt_tokens=args.prompt_tokens,
                                         image=args.image))
        else:
            from ..bench import soak

            result.update(soak.run(s.base, s.pid, clients=clients[0], seconds=args.seconds,
                                   disconnect_fraction=args.disconnect_fraction, bad_fraction=args.bad_fraction,
                                   max_tokens=args.max_tokens or 16))
    save(result, stem + ".json")
    if (plot.plot_serve if section == "serve" else plot.plot_soak)(result, stem + ".png"):
        print(f"wrote {stem}.png")
    print(f"wrote {stem}.json")
    return stem + ".json"
