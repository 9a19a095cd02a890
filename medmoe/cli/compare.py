"""`medmoe compare`: is one evaluation better than another beyond noise (paired bootstrap intervals)?"""

from __future__ import annotations

import argparse

DESCRIPTION = """Compare two evaluations of the same questions: the scores of A and B, and B - A with
a paired 95% bootstrap interval (the questions resampled once for both), per answer type and
classification method. Only questions both answered count (docs/evaluation.md). With --vs, two
recipes each trained several times: A's draws against B's, the interval resampling draws too."""

EXAMPLE = """examples:
  medmoe compare evals/slake-current evals/slake-new
  medmoe compare evals/slake-new-shuffled evals/slake-new   # what the image adds (--shuffle-images as A)
  medmoe compare official/answers.jsonl evals/slake-new/predictions.jsonl --gt data/slake --split test
  medmoe compare evals/nano-{1,2,3}/slake --vs evals/nano-contrastive-{1,2}/slake   # draws of two recipes

A row's verdict is "B better" or "A better" when the 95% interval of B - A excludes 0, else
"within noise": ship B only where it says "B better"."""


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="is evaluation B better than A beyond noise? (paired intervals)",
                              description=DESCRIPTION,
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="A B",
                   help="the current model's `medmoe eval` output folder (or a predictions file), then the "
                        "candidate's, on the same split; with --vs, every draw of the current recipe")
    p.add_argument("--vs", nargs="+", metavar="B", help="every draw of the candidate recipe (each an evaluation of "
                                                        "one training): the runs before --vs are A's draws")
    p.add_argument("--gt", help="ground truth: a records file or prepared folder (default: the data A and B scored, "
                                "as their metrics.json says)")
    p.add_argument("--split", help="the split of --gt (default: the one A and B scored, else test)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--out", help="also write the comparison JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..errors import ConfigError
    from ..evaluation.compare import compare, compare_draws, compare_draws_text, compare_text
    from ..evaluation.io import write_json

    if args.vs:
        result = compare_draws(args.runs, args.vs, gt=args.gt, split=args.split)
        text = compare_draws_text
    elif len(args.runs) == 2:
        result, text = compare(*args.runs, gt=args.gt, split=args.split), compare_text
    else:
        raise ConfigError(f"compare takes two evaluations, A and B ({len(args.runs)} given); to compare several "
                         "trainings of two recipes, give A's draws, then --vs and B's draws")
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0
