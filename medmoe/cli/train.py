"""`medmoe train --recipe FILE [--phase tower|1|2|router|3|all] [--resume] [key=value ...]`"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a Med-MoE model: phase tower, 1, 2, router, 3 (or all)",
        description="Run the training phases of a recipe (a bundled name: tiny, nano, phi2, stablelm; or a JSON "
                    "file). Overrides use dotted keys, e.g. phase2.lr=1e-4 phase3.moe.expert_type=lora; every key, its type "
                    "and default: docs/settings.md. "
                    "Several GPUs: torchrun --nproc_per_node N -m medmoe train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", required=True, help="bundled recipe name or path to a recipe JSON file")
    p.add_argument("--phase", default="all", choices=["tower", "1", "2", "router", "3", "all"],
                   help="tower (only with tower.enabled=true): the vision tower pretrained on image-level labels")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the phase")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..training import distributed
    from ..training.phases import run_or_skip
    from ..training.recipe import PHASES, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    phases = PHASES if args.phase == "all" else (args.phase,)
    for phase in phases:
        result = run_or_skip(recipe, phase, resume=args.resume)
        if phase == "tower":
            report_tower(result)
        elif phase == "router":
            m = result["metrics"]
            if m:
                print(f"router: held-out accuracy {m['heldout_accuracy']:.3f} on {m['heldout_n']} samples "
                      f"(train {m['train_accuracy']:.3f}); saved in {result['dir']}")
        else:
            last = result.get("last") or {}
            print(f"phase {phase}: {result['steps']} steps, last loss {last.get('loss', float('nan')):.4f}; "
                  f"model in {result['model_dir']}, loss curve {result.get('loss_png')}")
    distributed.cleanup()
    return 0


def report_tower(result: dict) -> None:
    """The tower phase's held-out label scores, printed and written to DIR/tower_metrics.json."""
    import json
    import os

    from ..evaluation.labels import format_label_report, label_report
    from ..files import atomic_write_text

    if result.get("skipped") or not result.get("predictions"):  # off, or not the main process
        return
    found = result["predictions"]
    report = {**label_report({k: found[k] for k in ("before", "after")}), "images": found["images"],
              "image_size": found["image_size"]}
    atomic_write_text(os.path.join(result["dir"], "tower_metrics.json"), json.dumps(report, indent=2) + "\n")
    for line in format_label_report(report):
        print(line)
    print(f"tower: {found['images']['train']} training and {found['images']['heldout']} held-out images; "
          f"saved in {result['dir']}")
