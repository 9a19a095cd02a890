"""Bootstrap intervals, balanced accuracy and calibration (evaluation/intervals.py) and where they
appear: metrics.json's aggregates, classification metrics, the printed score."""

import numpy as np
import pytest

from medmoe.evaluation.classification import classification_metrics
from medmoe.evaluation.intervals import balanced_accuracy, bootstrap_ci, calibration, plot_calibration
from medmoe.evaluation.metrics import aggregate
from medmoe.evaluation.report import score_text
from medmoe.evaluation.scoring import GroundTruth, score_predictions


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(1)
    small = (rng.random(100) < 0.6).astype(float)
    large = (rng.random(2000) < 0.6).astype(float)
    lo, hi = bootstrap_ci(small, scale=100)
    assert lo < 100 * small.mean() < hi
    assert 10 < hi - lo < 25  # about 2 x 1.96 x sqrt(.24 / 100) = 19 points
    lo2, hi2 = bootstrap_ci(large, scale=100)
    assert hi2 - lo2 < (hi - lo) / 3
    assert bootstrap_ci(small, scale=100) == [lo, hi]  # seeded: the same report twice
    assert bootstrap_ci([1.0]) is None
    assert bootstrap_ci([1.0] * 20, scale=100) == [100.0, 100.0]


def test_balanced_accuracy_exposes_a_model_that_always_says_the_majority_class():
    truth = [1] * 75 + [0] * 25
    always_majority = [1] * 100
    assert balanced_accuracy(truth, always_majority, 2) == 50.0
    m = classification_metrics(truth, always_majority, ["normal", "pneumonia"])
    assert m["accuracy"] == 75.0 and m["balanced_accuracy"] == 50.0
    assert m["per_class_recall"] == {"normal": 0.0, "pneumonia": 100.0}
    lo, hi = m["accuracy_ci95"]
    assert lo < 75.0 < hi
    assert m["balanced_accuracy_ci95"] == [50.0, 50.0]  # every resample: recall 0 and 100


def test_calibration_tells_calibrated_from_overconfident_answers():
    rng = np.random.default_rng(0)
    conf = rng.random(5000)
    calibrated = (rng.random(5000) < conf).astype(float)  # right with probability = confidence
    overconfident = (rng.random(5000) < 0.5).astype(float)  # a coin, whatever the confidence says
    good, bad = calibration(conf, calibrated), calibration(conf, overconfident)
    assert good["ece"] < 3 < 20 < bad["ece"]
    assert sum(b["n"] for b in good["bins"]) == 5000
    curve = {c["coverage"]: c["accuracy"] for c in good["coverage"]}
    assert curve[0.5] > curve[0.8] > curve[1.0]  # withholding the least confident answers helps
    assert curve[1.0] == pytest.approx(100 * calibrated.mean())
    flat = {c["coverage"]: c["accuracy"] for c in bad["coverage"]}
    assert abs(flat[0.5] - flat[1.0]) < 5  # ... and only when confidence carries information
    assert calibration([], []) is None


def test_calibration_plot_is_written(tmp_path):
    result = calibration([0.9, 0.8, 0.3, 0.6], [1, 1, 0, 0])
    assert plot_calibration(result, tmp_path / "c.png", title="x")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_aggregates_carry_intervals_and_the_score_prints_them():
    items = [("CLOSED", {"accuracy": float(i % 3 != 0), "accuracy_strict": float(i % 3 != 0), "f1": 0.5})
             for i in range(30)]
    agg = aggregate(items)
    lo, hi = agg["closed"]["ci95"]["accuracy"]
    assert lo < agg["closed"]["accuracy"] < hi
    gts = [GroundTruth(id=str(i), question="q", answer="yes" if i % 2 else "no", answer_type="CLOSED")
           for i in range(40)]
    metrics, _ = score_predictions({str(i): "yes" for i in range(40)}, gts)
    assert metrics["total"]["closed"]["accuracy"] == 50.0
    text = score_text(metrics)
    assert "95% bootstrap intervals" in text and "closed accuracy 50.00 [" in text


def test_batch_calibration_evens_out_a_model_that_leans_toward_one_label():
    import torch

    from medmoe.evaluation.classification import batch_calibrated

    # The model prefers label 1 by the same margin for every input; the evidence per input
    # (+/- 1 on label 0) decides only after that lean is divided out.
    truth = [0, 1] * 20
    evidence = torch.tensor([[1.0, 0.0] if t == 0 else [-1.0, 0.0] for t in truth])
    logprobs = (evidence + torch.tensor([0.0, 2.5])).log_softmax(-1)
    raw = logprobs.argmax(-1).tolist()
    fixed = batch_calibrated(logprobs).argmax(-1).tolist()
    assert balanced_accuracy(truth, raw, 2) == 50.0  # always label 1
    assert balanced_accuracy(truth, fixed, 2) == 100.0
    assert torch.allclose(batch_calibrated(logprobs).exp().sum(-1), torch.ones(40))


def test_contextual_calibration_divides_out_what_the_question_alone_says():
    import torch

    from medmoe.evaluation.classification import contextual_calibrated, method_predictions

    # Without its image the question already leans toward label 1 by 2.5; each image adds +/- 1 on
    # label 0. Divided by the question's own lean, a single image is classified by its evidence.
    truth = [0, 1] * 5
    evidence = torch.tensor([[1.0, 0.0] if t == 0 else [-1.0, 0.0] for t in truth])
    lean = torch.tensor([0.0, 2.5])
    logprobs = (evidence + lean).log_softmax(-1)
    prior = lean.log_softmax(-1).expand(10, 2)
    assert balanced_accuracy(truth, logprobs.argmax(-1).tolist(), 2) == 50.0
    assert contextual_calibrated(logprobs[:1], prior[:1]).argmax(-1).tolist() == [0]  # one image alone
    assert torch.allclose(contextual_calibrated(logprobs, prior).exp().sum(-1), torch.ones(10, dtype=torch.float64))
    methods = method_predictions(logprobs.tolist(), ["b"] * 10, ["a", "b"], prior.tolist())
    assert list(methods) == ["loglik", "loglik_calibrated", "loglik_contextual", "generate"]
    assert methods["loglik_contextual"] == truth
    assert "loglik_contextual" not in method_predictions(logprobs.tolist(), ["b"] * 10, ["a", "b"])
