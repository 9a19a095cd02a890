"""`medmoe eval`: batched greedy answers for a prepared split, metrics, routing and a report."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a prepared split (resumable)",
                              description="Generate answers greedily for every question of a split, score them "
                                          "(docs/evaluation.md), analyse expert routing and write predictions.jsonl, "
                                          "metrics.json, report.md and report.html to --out. Rerunning with the same "
                                          "--out resumes where it stopped.")
    p.add_argument("--model", default="nano",
                   help="model folder, or a bundled model; default: nano, the bundled Med-MoE-Nano")
    p.add_argument("--data", required=True, help="records file (JSONL / LLaVA json), prepared dataset folder, or 'sample'")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=None,
                   help="questions decoded together (the engine's slots; default 128 on a GPU, fewer where "
                        "their KV cache would take over a quarter of its free memory; 8 on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit in tokens (default 64)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (quick checks)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-routing", dest="routing", action="store_false", help="skip the routing analysis")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="prefill every question's whole prompt, not the template's common start once per batch "
                        "(the same answers, slower; for checking)")
    p.add_argument("--shuffle-images", action="store_true",
                   help="control run: every question gets another question's image (a fixed permutation), to "
                        "measure how much of the score comes from the question alone")
    p.add_argument("--admit-batch", type=int, default=None,
                   help="while requests decode, new prompts wait until this many slots are free (at most 8 decode steps) "
                        "and are prefilled together; default a quarter of the slots on a GPU, 1 on the CPU")
    p.add_argument("--no-prefill-graphs", dest="prefill_graphs", action="store_false", default=None,
                   help="GPU: prefill through the model's own forward, not CUDA graphs written into the KV cache "
                        "(for measuring; bf16 answers can differ where two tokens are near-tied)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..evaluation.evaluate import DEFAULT_MAX_NEW_TOKENS, EvalSettings, evaluate
    from ..evaluation.report import score_text

    if any(value is not None and value < 1 for value in (args.batch_size, args.max_new_tokens, args.admit_batch)):
        raise ConfigError("--batch-size, --max-new-tokens and --admit-batch must be at least 1")
    settings = EvalSettings(model=args.model, data=args.data, out=args.out, split=args.split,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                            limit=args.limit, device=args.device, dtype=args.dtype, routing=args.routing,
                            share_prefix=args.share_prefix, shuffle_images=args.shuffle_images,
                            admit_batch=args.admit_batch, prefill_graphs=args.prefill_graphs)
    metrics = evaluate(settings, long_lived=True)  # the process ends with it
    if metrics["vqa"]:
        print(score_text(metrics["vqa"]))
    for dataset, methods in (metrics["classification"] or {}).items():
        print(f"{dataset}: " + ", ".join(_classification_line(m, r) for m, r in methods.items()))
    for kind, calib in (metrics.get("calibration") or {}).items():
        at80 = next((c for c in calib["coverage"] if c["coverage"] == 0.8), None)
        print(f"{kind} answers: confidence ECE {calib['ece']:.2f}"
              + (f"; {at80['accuracy']:.2f} ({calib['scored_by']}) on the 80% most confident "
                 f"(confidence >= {at80['threshold']:.3f}) against {calib['accuracy']:.2f} on all" if at80 else ""))
    acc = (metrics["routing"] or {}).get("router_accuracy") or {}
    if acc.get("samples"):
        print(f"router modality accuracy: {acc['sample_accuracy']:.2f}% of {acc['samples']} samples")
    if metrics["run"].get("engine"):
        from ..engine.stats import summary_line

        print(summary_line(metrics["run"]["engine"]))
    print(f"report: {args.out}/report.html")
    return 0


def _classification_line(method: str, r: dict) -> str:
    ci = lambda key: f" [{r[key][0]:.2f}, {r[key][1]:.2f}]" if r.get(key) else ""
    line = f"{method} accuracy {r['accuracy']:.2f}%{ci('accuracy_ci95')}"
    if r.get("balanced_accuracy") is not None:
        line += f", balanced {r['balanced_accuracy']:.2f}%{ci('balanced_accuracy_ci95')}"
    if r.get("calibration"):
        line += f", ECE {r['calibration']['ece']:.2f}"
    return line
