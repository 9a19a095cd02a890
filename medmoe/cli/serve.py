"""`medmoe serve`: the OpenAI-compatible HTTP server and the web page, on one port."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError
from ._model_args import add_model_args, confidence_level, loading


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: OpenAI chat-completions API + a web page (upload, ask, routing)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", "--name", dest="name", default=None,
                   help="model id reported by /v1/models and accepted in requests (default: medmoe-nano for the "
                        "bundled model, else the folder name)")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /v1/ endpoints (default: $MEDMOE_API_KEY; the "
                        "environment variable keeps the key out of the process list)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together (the engine's KV-cache slots; more wait in the queue; "
                        "default 32 on a GPU, 8 on a CPU)")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests; more are answered 503")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before a 504")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest decoded image (width x height)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt, image tokens included")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the decode step through torch.compile, compiled during start-up's warm-up; default: "
                        "on a GPU (one client's stream about 1.3x faster; start-up takes minutes longer the first "
                        "time: --no-compile starts at once), off on the CPU")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="memory for the keys and values of prompt prefixes kept across requests (the system "
                        "prompt, an image asked about again); default 256")
    p.add_argument("--no-prefix-cache", dest="prefix_cache_mb", action="store_const", const=0.0,
                   help="prefill every prompt in full")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: the model's threads (default: the cores less one, which the HTTP side and the "
                        "clients on the same machine need; docs/speed.md)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="while requests decode, the most prompt tokens prefilled between two decode steps "
                        "(longer prompts in pieces); 0: whole prompts; default 256 on the CPU, 2048 on a GPU")
    p.add_argument("--admit-batch", type=int, default=None,
                   help="while requests decode, new prompts wait until this many slots are free (at most 8 decode steps) "
                        "and are prefilled together; default a quarter of the slots on a GPU, 1 on the CPU")
    p.add_argument("--no-prefill-graphs", dest="prefill_graphs", action="store_false", default=None,
                   help="GPU: prefill through the model's own forward, not CUDA graphs written into the KV cache "
                        "(for measuring; bf16 answers can differ where two tokens are near-tied)")
    p.add_argument("--min-confidence", type=confidence_level, default=None, metavar="P",
                   help="mark answers whose confidence is below P (0 to 1) \"withheld\" in the response; the web page "
                        "shows them as withheld (medmoe eval reports the accuracy each threshold keeps)")
    p.set_defaults(func=run)


def model_threads(requested: int | None, cores: int) -> int:
    """The server's torch threads on a CPU: as asked, else every core but one. The event loop,
    streaming and any client on the machine then keep a core: on 2 cores, one model thread served
    1 and 8 clients 1.2x and 1.07x faster than two (docs/lab/speed-history.md)."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads {requested}: give at least 1")
        return requested
    return max(1, cores - 1)


def run(args) -> int:
    import torch

    from ..model.pretrained import pick_device
    from ..serving.auth import is_loopback
    from ..serving.server import Limits, create_app, serve

    if args.admit_batch is not None and args.admit_batch < 1:
        raise ConfigError(f"--admit-batch {args.admit_batch}: give at least 1 (1: new requests join at every step)")
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    default_max_tokens=min(args.max_new_tokens, args.max_tokens), max_batch=args.max_batch,
                    queue_size=args.queue_size, timeout_s=args.timeout, prefix_cache_mb=args.prefix_cache_mb,
                    prefill_chunk=args.prefill_chunk, admit_batch=args.admit_batch,
                    prefill_graphs=args.prefill_graphs, min_confidence=args.min_confidence)
    device = pick_device(args.device)
    compile = device.type == "cuda" if args.compile is None else args.compile
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(model_threads(args.threads, cores))
    api_key = args.api_key or os.environ.get("MEDMOE_API_KEY") or None
    if api_key is None and not is_loopback(args.host):
        print(f"medmoe serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "port can use the model; set MEDMOE_API_KEY or --api-key", file=sys.stderr)
    if compile:
        print("medmoe serve: the decode step is compiled with torch.compile during warm-up (minutes the first "
              "time; --no-compile skips it)", file=sys.stderr)
    with loading(args.model):
        app = create_app(args.model, limits=limits, model_name=args.name, device=args.device, dtype=args.dtype,
                         quantize=args.quantize, api_key=api_key, compile=compile)
    print(f"medmoe serve: {app.state.model_name} on http://{args.host}:{args.port}/ (web page), /v1/chat/completions, "
          f"/v1/models, /health{'; API key required on /v1/' if api_key else ''}", file=sys.stderr)
    serve(app, host=args.host, port=args.port)
    return 0
