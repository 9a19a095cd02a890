"""`medmoe params`: parameter counts of a named config or a model folder, as JSON."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("params", help="parameter counts (total, activated per token) as JSON, no weights loaded")
    p.add_argument("--config", default="phi2", help="preset (tiny, nano, phi2, stablelm, ...), model folder or config.json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--moe", dest="moe", action="store_true", default=None, help="count as Med-MoE (upcycled)")
    group.add_argument("--dense", dest="moe", action="store_false", help="count the dense model")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.params import count_parameters
    from ..model.presets import load_config

    config = load_config(args.config)
    moe = args.moe if args.moe is not None else (True if config.moe_config.enabled or args.config in ("nano",) else None)
    print(json.dumps(count_parameters(config, moe=moe), indent=2))
    return 0
