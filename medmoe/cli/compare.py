"""`medmoe compare`: is one evaluation better than another beyond noise (paired bootstrap intervals)?"""

from __future__ import annotations

import argparse

DESCRIPTION = """Compare two evaluations of the same questions: the scores of A and B, and B - A with
a paired 95% bootstrap interval (the questions resampled once for both), per answer type and
classification method. Only questions both answered count (docs/evaluation.md)."""

EXAMPLE = """examples:
  medmoe compare evals/slake-current evals/slake-new
  medmoe compare evals/slake-new-shuffled evals/slake-new   # what the image adds (--shuffle-images as A)
  medmoe compare official/answers.jsonl evals/slake-new/predictions.jsonl --gt data/slake --split test

A row's verdict is "B better" or "A better" when the 95% interval of B - A excludes 0, else
"within noise": ship B only where it says "B better"."""


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="is evaluation B better than A beyond noise? (paired intervals)",
                              description=DESCRIPTION,
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the current model's `medmoe eval` output folder, or a predictions file")
    p.add_argument("b", help="the candidate's, on the same split")
    p.add_argument("--gt", help="ground truth: a records file or prepared folder (default: the data A and B scored, "
                                "as their metrics.json says)")
    p.add_argument("--split", help="the split of --gt (default: the one A and B scored, else test)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--out", help="also write the comparison JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..evaluation.compare import compare, compare_text
    from ..evaluation.io import write_json

    result = compare(args.a, args.b, gt=args.gt, split=args.split)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else compare_text(result))
    return 0
