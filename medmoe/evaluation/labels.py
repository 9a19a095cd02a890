"""Held-out scores of the tower phase's label heads (training/tower.py): per label family,
accuracy with its 95% bootstrap interval over images, balanced accuracy and the share a constant
guess of the commonest class gets; micro F1 for a multi-label family (SLAKE's structures)."""

from __future__ import annotations

import numpy as np

from .intervals import balanced_accuracy, bootstrap_ci, bootstrap_ci_paired


def micro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """2 TP / (true labels + predicted labels), in percent, over every image and class."""
    denominator = float(truth.sum() + pred.sum())
    return 100.0 * 2 * float((truth * pred).sum()) / denominator if denominator else 0.0


def family_scores(entry: dict) -> dict:
    """entry: {"truth", "pred", "classes", "multi_label"} of one family (lists of class indices,
    or of 0/1 rows for a multi-label family)."""
    truth, pred = np.asarray(entry["truth"]), np.asarray(entry["pred"])
    n = len(truth)
    if n == 0:
        return {"n": 0}
    if entry["multi_label"]:
        constant = np.repeat(truth.mean(0, keepdims=True) >= 0.5, n, 0).astype(int)
        return {"n": n, "classes": entry["classes"], "micro_f1": round(micro_f1(truth, pred), 2),
                "ci": bootstrap_ci_paired(micro_f1, truth, pred), "chance": round(micro_f1(truth, constant), 2)}
    hits = (truth == pred).astype(float)
    return {"n": n, "classes": entry["classes"], "accuracy": round(100 * float(hits.mean()), 2),
            "ci": bootstrap_ci(hits, scale=100.0),
            "balanced_accuracy": round(balanced_accuracy(truth, pred, entry["classes"]), 2),
            "chance": round(100 * float(np.bincount(truth).max()) / n, 2)}


def label_report(predictions: dict) -> dict:
    """{"before": {family: scores}, "after": {...}, "change": {...}} from the phase's held-out
    predictions. "change": after minus before in accuracy points, on the same images, with a
    paired 95% bootstrap interval (the images resampled once for both)."""
    report = {when: {family: family_scores(entry) for family, entry in families.items()}
              for when, families in predictions.items()}
    before, after = predictions.get("before", {}), predictions.get("after", {})
    report["change"] = {family: paired_change(before[family], entry) for family, entry in after.items()
                        if family in before and not entry["multi_label"] and entry["truth"]}
    return report


def paired_change(before: dict, after: dict) -> dict:
    hits = [(np.asarray(e["truth"]) == np.asarray(e["pred"])).astype(float) for e in (before, after)]
    diff = hits[1] - hits[0]
    return {"points": round(100 * float(diff.mean()), 2), "ci": bootstrap_ci(diff, scale=100.0)}


def format_label_report(report: dict) -> list[str]:
    """One line per family: held-out score before -> after, with the intervals."""
    lines = []
    for family, after in report.get("after", {}).items():
        before = report.get("before", {}).get(family, {})
        key = "micro_f1" if "micro_f1" in after else "accuracy"
        change = report.get("change", {}).get(family)
        if key in after:
            lines.append(f"tower {family}: held-out {key} {_score(before, key)} -> {_score(after, key)}"
                         + (f", change {_score(change, 'points')}" if change else "")
                         + f" on {after['n']} images, {after['classes']} classes (constant guess {after['chance']:.1f})")
    return lines


def _score(scores: dict, key: str) -> str:
    """"93.3 [86.7, 100.0]"."""
    if key not in scores:
        return "n/a"
    ci = scores.get("ci")
    return f"{scores[key]:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
