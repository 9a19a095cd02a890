"""Image classification with the generative model, two ways:

- log-likelihood (discriminative): score every label choice c by sum_t log p(c_t | prompt, c_<t)
  over the answer tokens (those the training labels mark, end-of-sequence included) and pick
  the best. Every answer is a valid label; no parsing.
- free generation: generate an answer and map it to the label whose normalised text it equals,
  else the only label it contains; otherwise it is "unparsed" (wrong).

Metrics: accuracy, per-class recall and a confusion matrix (rows: true class, columns: predicted;
an extra last column counts unparsed generations).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.templates import IGNORE_INDEX, Turn
from .metrics import normalize

UNPARSED = -1


@torch.no_grad()
def choice_logprobs(model, processor, question: str, image, choices: Sequence[str],
                    reduction: str = "sum") -> torch.Tensor:
    """[len(choices)] log-likelihood of each choice as the answer (summed, or mean per token)."""
    prompt = processor.prompt(question, has_image=image is not None)
    batch = processor.pad([processor.encode([Turn(prompt, answer=c)]) for c in choices], padding_side="right")
    pixels = None
    if image is not None:
        pixels = processor.image_tensor(image).unsqueeze(0).expand(len(choices), -1, -1, -1)
    device = model.device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                pixel_values=None if pixels is None else pixels.to(device))
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    token_lp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (token_lp * keep).sum(-1)
    return (total / keep.sum(-1).clamp(min=1) if reduction == "mean" else total).cpu()


def classify_loglik(model, processor, questions: Sequence[str], images: Sequence, choices: Sequence[str],
                    reduction: str = "sum", progress: bool = False) -> list[int]:
    from tqdm import tqdm

    items = tqdm(list(zip(questions, images)), desc="log-likelihood", disable=not progress)
    return [int(choice_logprobs(model, processor, q, img, choices, reduction).argmax()) for q, img in items]


def parse_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the label a free-text answer names, or UNPARSED."""
    norm = normalize(text)
    labels = [normalize(c) for c in choices]
    if norm in labels:
        return labels.index(norm)
    words = f" {norm} "
    found = [i for i, label in enumerate(labels) if label and f" {label} " in words]
    return found[0] if len(found) == 1 else UNPARSED


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Accuracy and per-class recall in percent; confusion[true][pred] with a last 'unparsed' column."""
    k = len(classes)
    confusion = [[0] * (k + 1) for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p if 0 <= p < k else k] += 1
    n = len(y_true)
    correct = sum(confusion[i][i] for i in range(k))
    recall = {c: (100.0 * confusion[i][i] / sum(confusion[i]) if sum(confusion[i]) else None)
              for i, c in enumerate(classes)}
    return {"n": n, "accuracy": 100.0 * correct / n if n else 0.0, "per_class_recall": recall,
            "classes": list(classes), "confusion": confusion, "unparsed": sum(row[k] for row in confusion)}


def plot_confusion(metrics: dict, path, title: str = "") -> None:
    """Confusion matrix as a PNG (row-normalised colours, raw counts written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = metrics["classes"]
    cm = np.array(metrics["confusion"], dtype=float)
    if not cm[:, -1].any():
        cm = cm[:, :-1]  # no unparsed answers: drop the column
    columns = classes + (["unparsed"] if cm.shape[1] > len(classes) else [])
    shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(3.2, 1.6 + 0.5 * len(columns))
    fig, ax = plt.subplots(figsize=(size + 1.4, size + 0.4), layout="constrained")
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black",
                    fontsize=8)
    accuracy = f"accuracy {metrics['accuracy']:.1f}% (n={metrics['n']})"
    ax.set_title(f"{title}\n{accuracy}" if title else accuracy, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.savefig(path, dpi=120)
    plt.close(fig)
