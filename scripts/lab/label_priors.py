"""What dividing out a prior does to label likelihoods (docs/lab/nano-v2.md, "Contextual calibration").

    python scripts/lab/label_priors.py content-free PN_PREDICTIONS     # PneumoniaMNIST: priors from blank
        # images and from the question alone, against an evaluation's predictions.jsonl (choice_logprobs)
    python scripts/lab/label_priors.py yes-no DATA/vqa-rad [--split test]  # closed yes/no questions: "yes" /
        # "no" likelihoods with the image, without it, and with the question's lean divided out to a power

Both load the bundled model (`--model`, float32 on the CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medmoe.evaluation.classification import choice_logprobs, choice_logprobs_batch, classification_metrics
from medmoe.evaluation.intervals import balanced_accuracy, bootstrap_ci_paired
from medmoe.evaluation.metrics import normalize

CLASSES = ["normal", "pneumonia"]
PN_QUESTION = "Which class does this chest X-ray belong to? Options: normal, pneumonia."
YES_NO = ["Yes", "No", "yes", "no"]  # both spellings of each answer
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def blank_images() -> dict:
    from PIL import Image

    return {name: Image.new("RGB", (28, 28), (v, v, v)) for name, v in (("black", 0), ("grey", 128), ("white", 255))}


def content_free(model, processor, predictions: Path) -> list[str]:
    """Balanced accuracy and recalls of PneumoniaMNIST predictions divided by each prior."""
    rows = [json.loads(line) for line in predictions.open()]
    truth = [CLASSES.index(r["answer"]) for r in rows]
    probs = torch.tensor([r["choice_logprobs"] for r in rows], dtype=torch.float64).softmax(-1)
    priors = {name: choice_logprobs(model, processor, PN_QUESTION, image, CLASSES).double().softmax(-1)
              for name, image in {**blank_images(), "question alone": None}.items()}
    lines = [f"prior of {name}: " + ", ".join(f"{c} {p:.4f}" for c, p in zip(CLASSES, prior.tolist()))
             for name, prior in priors.items()]
    predicted = {name: divided.argmax(-1).tolist() for name, divided in
                 [("none", probs), ("batch mean", probs / probs.mean(0))] +
                 [(name, probs / prior) for name, prior in priors.items()]}
    for name, pred in predicted.items():
        m = classification_metrics(truth, pred, CLASSES)
        recall = " / ".join(f"{m['per_class_recall'][c]:.1f}" for c in CLASSES)
        lines.append(f"{name:15s} accuracy {m['accuracy']:.2f}  balanced {m['balanced_accuracy']:.2f}  recall {recall}")
    gain = lambda t, a, b: balanced_accuracy(t, b, 2) - balanced_accuracy(t, a, 2)
    for base in ("none", "batch mean"):
        difference = gain(truth, predicted[base], predicted["question alone"])
        low, high = bootstrap_ci_paired(gain, truth, predicted[base], predicted["question alone"])
        lines.append(f"question alone - {base}, balanced: {difference:+.2f} [{low:+.2f}, {high:+.2f}] (paired)")
    return lines


def yes_no_scores(logprobs: torch.Tensor) -> torch.Tensor:
    """[n, 2] log p(yes), log p(no) among the two, from the four spellings' likelihoods."""
    return torch.stack([logprobs[:, [0, 2]].logsumexp(-1), logprobs[:, [1, 3]].logsumexp(-1)], -1).log_softmax(-1)


def yes_no(model, processor, data: Path, split: str) -> list[str]:
    """Accuracy on closed yes/no questions with the question's lean divided out to each power."""
    records = [json.loads(line) for line in (data / f"{split}.jsonl").open()]
    records = [r for r in records if r["answer_type"].strip().upper() == "CLOSED" and normalize(r["answer"]) in ("yes", "no")]
    root = Path(json.loads((data / "dataset.json").read_text())["image_root"])
    questions = [r["question"] for r in records]
    with_image = yes_no_scores(choice_logprobs_batch(model, processor, questions, [root / r["image"] for r in records],
                                                     YES_NO).double())
    alone = yes_no_scores(choice_logprobs_batch(model, processor, questions, [None] * len(records), YES_NO).double())
    truth = torch.tensor([0 if normalize(r["answer"]) == "yes" else 1 for r in records])
    accuracy = lambda scores: 100 * (scores.argmax(-1) == truth).double().mean().item()
    lines = [f"{data.name} {split}: {len(records)} closed yes/no questions"]
    lines += [f"alpha {a}: accuracy {accuracy(with_image - a * alone):.2f}" for a in ALPHAS]
    return lines + [f"the question alone: accuracy {accuracy(alone):.2f}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["content-free", "yes-no"])
    parser.add_argument("path", type=Path, help="content-free: a predictions.jsonl; yes-no: a prepared dataset folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="nano")
    args = parser.parse_args(argv)
    from medmoe.serving.api import MedMoE

    bot = MedMoE.load(args.model, device="cpu", dtype="float32")
    with torch.no_grad():
        lines = (content_free(bot.model, bot.processor, args.path) if args.what == "content-free"
                 else yes_no(bot.model, bot.processor, args.path, args.split))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
