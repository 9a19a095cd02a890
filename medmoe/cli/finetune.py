"""`medmoe finetune --model nano --data DATA --out DIR [--epochs 2] [--resume] [key=value ...]`"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a trained model (the bundled nano by default) on your data",
        description="Continue training a trained model on new data, as the paper does on each benchmark's train "
                    "split. A Med-MoE model trains its experts and meta expert (phase 3's parameters), a dense "
                    "model phase 2's. key=value sets any phase setting (docs/settings.md: "
                    "phaseN keys), e.g. grad_accum=4 max_steps=200. Several GPUs: torchrun ... -m medmoe finetune.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="nano", help="a trained model folder, or a bundled model name")
    p.add_argument("--data", action="append", required=True,
                   help="a data source (prepared folder, records file, 'sample'; 'DIR*N' repeats it N times); "
                        "repeat --data for several")
    p.add_argument("--out", required=True, help="output folder: model/, checkpoints, loss curve, summary.json")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-4, help="2e-4 suits LoRA experts and adapters; use less for full experts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-router", action="store_true", help="also train the router")
    p.add_argument("--train-projector", action="store_true",
                   help="also train the projector (a Med-MoE model; a dense model trains it anyway)")
    p.add_argument("--train-vision", action="store_true",
                   help="also train the vision tower, for images unlike the model's training data; give the image "
                        "path a lower rate than the experts, e.g. lr_groups='{\"vision\": 2e-5, \"projector\": 2e-5}' "
                        "(docs/training.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="phase settings")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training import distributed
    from ..training.finetune import finetune
    from ..training.recipe import phase_recipe

    phase = phase_recipe({"data": args.data, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                          "max_length": 512, "save_every": 100}, args.overrides)
    result = finetune(args.model, phase, args.out, resume=args.resume, train_router=args.train_router, seed=args.seed,
                      train_projector=args.train_projector, train_vision=args.train_vision)
    last = result.get("last") or {}
    print(f"fine-tune: {result['steps']} steps, last loss {last.get('loss', float('nan')):.4f}; model in "
          f"{result['model_dir']} (medmoe eval --model {result['model_dir']} ...; medmoe export for a compact delta)")
    distributed.cleanup()
    return 0
