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
from ..generation.generate import prefill_shared_prefix, shared_prefix_length
from .intervals import balanced_accuracy, bootstrap_ci, bootstrap_ci_paired
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
                pixel_values=None if pixels is None else pixels.to(device),
                prompt_mask=batch["labels"].eq(IGNORE_INDEX).to(device))
    return answer_scores(out.logits[:, :-1], batch["labels"][:, 1:].to(device), reduction).cpu()


def answer_scores(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """[rows]: log-likelihood of each row's answer tokens (targets not IGNORE_INDEX), summed or
    averaged; logits[:, t] predicts targets[:, t]."""
    keep = targets != IGNORE_INDEX
    token_lp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (token_lp * keep).sum(-1)
    return total / keep.sum(-1).clamp(min=1) if reduction == "mean" else total


@torch.no_grad()
def choice_logprobs_batch(model, processor, questions: Sequence[str], images: Sequence, choices: Sequence[str],
                          reduction: str = "sum", max_rows: int = 32, share_prefix: bool = True) -> torch.Tensor:
    """[len(questions), len(choices)]: `choice_logprobs` for many questions, a few forward passes.

    Every (question, choice) pair is one row, left-padded so that all answers end at the last
    position: the output layer then runs on the last few positions only (a [rows, vocab] slice,
    not [rows, length, vocab]), and each image is encoded once for all its choices. At most
    `max_rows` rows go through at once: past about 32 rows of 100 tokens a 2-core CPU gets slower
    per row (measured: 268 ms at 16 rows, 436 at 64, 527 at 128). The rows' common start (the
    template's system prompt) is prefilled once (`share_prefix`, as in generation).
    """
    n, k = len(questions), len(choices)
    if n == 0:
        return torch.empty(0, k)
    per_pass = max(1, max_rows // k)
    if n > per_pass:
        return torch.cat([choice_logprobs_batch(model, processor, questions[i:i + per_pass], images[i:i + per_pass],
                                                choices, reduction, max_rows, share_prefix) for i in range(0, n, per_pass)])
    has_image = [img is not None for img in images]
    if any(has_image) and not all(has_image):  # mixed: score each question on its own
        return torch.stack([choice_logprobs(model, processor, q, img, choices, reduction) for q, img in zip(questions, images)])
    encoded = [processor.encode([Turn(processor.prompt(q, has_image=has_image[i]), answer=c)])
               for i, q in enumerate(questions) for c in choices]
    batch = processor.pad(encoded, padding_side="left")
    device = model.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    image_tokens = None
    if has_image[0]:
        pixels = torch.stack([processor.image_tensor(img) for img in images]).to(device, next(model.vision_tower.parameters()).dtype)
        image_tokens = model.encode_images(pixels).repeat_interleave(k, dim=0)
    targets = batch["labels"][:, 1:].to(device)
    keep_from = int((targets != IGNORE_INDEX).any(0).nonzero().min())  # first column holding an answer token
    last = targets.shape[1] - keep_from
    shared = min(shared_prefix_length(model, ids, mask), keep_from) if share_prefix else 0
    if shared:
        out = prefill_shared_prefix(model, ids, mask, shared, image_tokens=image_tokens, logits_to_keep=last + 1)[0]
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(inputs_embeds=model.embed_inputs(ids, None, image_tokens=image_tokens), attention_mask=mask,
                    position_ids=positions, logits_to_keep=last + 1,
                    prompt_mask=batch["labels"].eq(IGNORE_INDEX).to(device))
    # out.logits[:, :-1] predict the last `last` target positions
    return answer_scores(out.logits[:, :-1], targets[:, -last:], reduction).view(n, k).cpu()


def classify_loglik(model, processor, questions: Sequence[str], images: Sequence, choices: Sequence[str],
                    reduction: str = "sum", progress: bool = False, batch_size: int = 64) -> list[int]:
    from tqdm import tqdm

    preds = []
    for start in tqdm(range(0, len(questions), batch_size), desc="log-likelihood", disable=not progress):
        scores = choice_logprobs_batch(model, processor, questions[start:start + batch_size],
                                       images[start:start + batch_size], choices, reduction)
        preds += scores.argmax(-1).tolist()
    return preds


def parse_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the label a free-text answer names, or UNPARSED."""
    norm = normalize(text)
    labels = [normalize(c) for c in choices]
    if norm in labels:
        return labels.index(norm)
    words = f" {norm} "
    found = [i for i, label in enumerate(labels) if label and f" {label} " in words]
    return found[0] if len(found) == 1 else UNPARSED


def batch_calibrated(logprobs: torch.Tensor) -> torch.Tensor:
    """Label log-probabilities [N, C] with the model's average preference for each label over the
    N inputs divided out (batch calibration: p(y|x) / mean_x p(y|x), renormalised). A model that
    leans toward one label whatever the image shows (PneumoniaMNIST: "pneumonia") is evened out;
    no labels are used, only the inputs being classified."""
    probs = logprobs.float().softmax(-1)
    prior = probs.mean(0, keepdim=True)
    return (probs / prior).log().log_softmax(-1)


def contextual_calibrated(logprobs: torch.Tensor, prior_logprobs: torch.Tensor) -> torch.Tensor:
    """Label log-probabilities [N, C] with each question's label distribution without its image
    divided out (contextual calibration, Zhao et al. 2021, the image as the content): what the
    model would answer from the question's words alone no longer tips the answer. No data is used,
    so it applies to a single image as well as to a batch."""
    return (logprobs.double().log_softmax(-1) - prior_logprobs.double().log_softmax(-1)).log_softmax(-1)


def method_predictions(logprobs: Sequence[Sequence[float]], generated: Sequence[str], classes: Sequence[str],
                       priors: Sequence[Sequence[float]] | None = None) -> dict[str, list[int]]:
    """Each item's predicted class by every method (`report.METHODS`): the best label
    log-likelihood, the same batch-calibrated over these items, the same calibrated by each
    question without its image (where `priors`, those label log-likelihoods, are given), and the
    label the generated answer names (or UNPARSED)."""
    scores = torch.tensor([list(row) for row in logprobs], dtype=torch.float64)
    methods = {"loglik": scores.argmax(-1).tolist(), "loglik_calibrated": batch_calibrated(scores).argmax(-1).tolist()}
    if priors is not None:
        prior = torch.tensor([list(row) for row in priors], dtype=torch.float64)
        methods["loglik_contextual"] = contextual_calibrated(scores, prior).argmax(-1).tolist()
    return {**methods, "generate": [parse_choice(text, classes) for text in generated]}


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
    truth, pred = list(y_true), [p if 0 <= p < k else k for p in y_pred]
    return {"n": n, "accuracy": 100.0 * correct / n if n else 0.0,
            "accuracy_ci95": bootstrap_ci([float(t == p) for t, p in zip(truth, pred)], scale=100.0),
            "balanced_accuracy": balanced_accuracy(truth, pred, k),
            "balanced_accuracy_ci95": bootstrap_ci_paired(lambda t, p: balanced_accuracy(t, p, k), truth, pred),
            "per_class_recall": recall,
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
