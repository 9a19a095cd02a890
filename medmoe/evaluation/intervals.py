"""Confidence intervals and calibration: how far a score can be trusted, and how far an answer can.

- `bootstrap_ci`: a 95% percentile interval of a mean, by resampling the questions with
  replacement (a fixed seed, so a report is reproducible). Test sets of a few hundred questions
  give intervals several points wide: two recipes whose intervals overlap are not ranked.
- `balanced_accuracy` and `bootstrap_ci_paired`: the same for statistics of (truth, prediction)
  pairs, such as the mean of the per-class recalls, or of two runs' predictions on the same
  questions (the difference of their balanced accuracies).
- `bootstrap_ci_draws`: the paired difference of two recipes that were each trained several times
  (draws): the questions are resampled as above, and each side's draws as well, so the interval
  carries the spread between trainings of one recipe, which one draw a side cannot show.
- `calibration`: expected calibration error (ECE, equal-width confidence bins), the reliability
  diagram's bins, and accuracy against coverage when the least confident answers are withheld.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def _bounds(samples: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(samples, [tail, 1 - tail])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
                 scale: float = 1.0) -> list[float] | None:
    """[low, high] of the mean of `values` (times `scale`); None for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 200):  # blocks bound the index array at 200 x n
        stop = min(start + 200, resamples)
        means[start:stop] = x[rng.integers(0, x.size, (stop - start, x.size))].mean(axis=1)
    return _bounds(means * scale, level)


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float | None:
    """Mean over the classes present of each class's recall, in percent (None without samples)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    recalls = [float((p[t == c] == c).mean()) for c in range(num_classes) if (t == c).any()]
    return 100.0 * float(np.mean(recalls)) if recalls else None


def bootstrap_ci_paired(statistic: Callable[..., float | None], *columns: Sequence, resamples: int = RESAMPLES,
                        seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """[low, high] of `statistic(*columns)` over rows resampled together: (truth, prediction), or
    (truth, one run's prediction, another's) for a paired difference."""
    cols = [np.asarray(c) for c in columns]
    n = len(cols[0])
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)  # rows: a multi-label sample's labels move together
        value = statistic(*(c[idx] for c in cols))
        if value is not None:
            values.append(value)
    return _bounds(np.asarray(values), level) if values else None


def bootstrap_ci_draws(statistic: Callable[..., float | None], a: np.ndarray, b: np.ndarray, *columns: Sequence,
                       resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """[low, high] of statistic(b's scores, *columns) - statistic(a's scores, *columns), where `a`
    [draws, questions] and `b` hold per-question scores of each draw (a training) of two recipes and
    a side's scores are the mean over its draws. Each resample takes the questions as
    `bootstrap_ci_paired` does (the same generator and seed, so one draw a side gives its interval)
    and, from a second generator, each side's draws with replacement."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    cols = [np.asarray(c) for c in columns]
    n = a.shape[1]
    if n < 2:
        return None
    rng, draws = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        picked_a, picked_b = draws.integers(0, len(a), len(a)), draws.integers(0, len(b), len(b))
        rest = [c[idx] for c in cols]
        va = statistic(a[picked_a][:, idx].mean(axis=0), *rest)
        vb = statistic(b[picked_b][:, idx].mean(axis=0), *rest)
        if va is not None and vb is not None:
            values.append(vb - va)
    return _bounds(np.asarray(values), level) if values else None


def calibration(confidence: Sequence[float], correct: Sequence[float], bins: int = 10,
                coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)) -> dict | None:
    """ECE and reliability bins (percent) of answers with a confidence in [0, 1] and a 0/1 score;
    `coverage`: accuracy of the most confident fraction of answers, and the confidence threshold
    that keeps that fraction (a user abstains below it)."""
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    hit = np.asarray(correct, dtype=np.float64)
    n = conf.size
    if n == 0:
        return None
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.minimum(np.searchsorted(edges, conf, side="right") - 1, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        if count:
            gap = abs(hit[inside].mean() - conf[inside].mean())
            ece += gap * count / n
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": count,
                      "accuracy": 100.0 * float(hit[inside].mean()) if count else None,
                      "confidence": 100.0 * float(conf[inside].mean()) if count else None})
    order = np.argsort(-conf, kind="stable")
    curve = []
    for fraction in coverages:
        keep = max(1, int(round(fraction * n)))
        chosen = order[:keep]
        curve.append({"coverage": float(fraction), "n": keep, "accuracy": 100.0 * float(hit[chosen].mean()),
                      "threshold": float(conf[chosen].min())})
    return {"n": n, "ece": 100.0 * ece, "accuracy": 100.0 * float(hit.mean()),
            "mean_confidence": 100.0 * float(conf.mean()), "bins": table, "coverage": curve}


def plot_calibration(result: dict, path, title: str = "") -> bool:
    """Reliability diagram beside accuracy against coverage, as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    filled = [b for b in result["bins"] if b["n"]]
    centers = [100 * (b["low"] + b["high"]) / 2 for b in filled]
    left.bar(centers, [b["accuracy"] for b in filled], width=100 / len(result["bins"]) * 0.9, alpha=0.7,
             label="accuracy in bin")
    left.plot([0, 100], [0, 100], "k--", lw=1, label="perfect calibration")
    left.set(xlabel="confidence (%)", ylabel="accuracy (%)", xlim=(0, 100), ylim=(0, 100),
             title=f"reliability, ECE {result['ece']:.1f}")
    left.legend(loc="upper left", fontsize=8)
    curve = result["coverage"]
    right.plot([100 * c["coverage"] for c in curve], [c["accuracy"] for c in curve], "o-")
    right.set(xlabel="coverage (%): most confident answers kept", ylabel="accuracy (%)",
              title="accuracy against coverage")
    right.invert_xaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
