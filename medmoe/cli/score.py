"""`medmoe score`: the evaluation metrics for any predictions file, matched to ground truth by id."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="score a predictions file against ground truth (matched by id)",
                              description="Compute Med-MoE's VQA metrics (closed accuracy, open recall, EMS, BLEU, "
                                          "F1; see docs/evaluation.md) for predictions matched to ground truth by id.")
    p.add_argument("--pred", required=True, help="predictions: JSONL of {id, prediction} or the official {question_id, text}")
    p.add_argument("--gt", required=True, help="ground truth: canonical records JSONL or the official LLaVA json list")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--only-predicted", action="store_true",
                   help="score only items that have a prediction (default: a missing prediction counts as wrong)")
    p.add_argument("--out", help="also write the metrics JSON here")
    p.add_argument("--report", metavar="DIR", help="also write metrics.json, report.md and report.html to DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from ..evaluation.io import write_json
    from ..evaluation.report import score_text
    from ..evaluation.scoring import score_files

    metrics, rows = score_files(args.pred, args.gt, only_predicted=args.only_predicted)
    if args.out:
        write_json(args.out, metrics)
    if args.report:
        from pathlib import Path

        from ..evaluation.report import write_reports

        write_json(Path(args.report) / "metrics.json", {"vqa": metrics, "files": metrics["files"]})
        write_reports({"vqa": metrics, "files": metrics["files"]}, args.report, rows)
    print(json.dumps(metrics, indent=2) if args.json else score_text(metrics))
    if metrics["counts"].get("mapped_official_ids"):
        print(f"note: {metrics['counts']['mapped_official_ids']} numeric question ids (the official answer files') "
              "were matched to the ground-truth ids ending in them", file=sys.stderr)
    if metrics["counts"]["missing"] or metrics["counts"]["extra"]:
        c = metrics["counts"]
        print(f"warning: {c['missing']} ground-truth ids have no prediction, {c['extra']} predictions match no "
              f"ground-truth id", file=sys.stderr)
    return 0
