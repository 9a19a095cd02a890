"""Markdown and self-contained HTML reports from a metrics dict."""

import re

import torch

from medmoe.evaluation.classification import classification_metrics, plot_confusion
from medmoe.evaluation.metrics import score_item
from medmoe.evaluation.report import write_reports
from medmoe.evaluation.routing import RoutingStats, plot_routing
from medmoe.evaluation.scoring import GroundTruth, score_predictions


def test_reports(tmp_path):
    gt = [GroundTruth("q1", "Is there a mass?", "no", "CLOSED", "slake", "CT"),
          GroundTruth("q2", "Which organ | side?", "left lung", "OPEN", "slake", "CT")]
    vqa, rows = score_predictions({"q1": "not sure", "q2": "lung"}, gt)
    cls = classification_metrics([0, 1, 1], [0, 1, 0], ["normal", "pneumonia"])
    plot_confusion(cls, tmp_path / "confusion_loglik.png")
    stats = RoutingStats()
    idx = torch.tensor([[[0], [0], [1]]])
    stats.add([type("R", (), {"layer": 0, "expert_index": idx, "probs": torch.zeros(1, 3, 4)})()],
              torch.tensor([[9, 9, 5]]), torch.ones(1, 3), 9, ["CT"])
    routing = stats.summary()
    plot_routing(routing, tmp_path / "routing.png")
    metrics = {"run": {"model": "m", "data": "d.jsonl", "split": "test", "command": "medmoe eval --model m"},
               "vqa": vqa, "classification": {"pneumonia": {"loglik": cls}}, "routing": routing,
               "figures": {"routing": "routing.png", "confusion_pneumonia_loglik": "confusion_loglik.png"}}
    md, page = write_reports(metrics, tmp_path, rows)
    text = md.read_text()
    assert "medmoe eval --model m" in text and "| total | 2 | 1 |" in text
    assert "![" in text and "(routing.png)" in text
    assert "Which organ \\| side?" in text  # table cells escaped
    assert "Router modality accuracy" in text and "100.00% of 1 samples" in text
    h = page.read_text()
    assert h.count("data:image/png;base64,") == 2
    assert not re.search(r'src="(?!data:)', h)  # nothing fetched from elsewhere
    assert "&lt;" not in text and "not sure" in h


def test_results_row():
    from medmoe.evaluation.report import results_row

    agg = lambda r, a, s: {"open": {"recall": r}, "closed": {"accuracy": a, "accuracy_strict": s}}
    runs = [{"run": {"command": "medmoe eval --data a"}, "vqa": {"by": {"dataset": {"vqa-rad": agg(50, 80, 70)}}}},
            {"run": {"command": "medmoe eval --data b"}, "vqa": {"by": {"dataset": {"slake": agg(75.123, 81, 79.5)}}}},
            {"run": {"command": "medmoe eval --data c"},
             "classification": {"pneumoniamnist": {"loglik": {"accuracy": 95.6107}, "generate": {"accuracy": 90.0}}}}]
    row = results_row("nano", "0.2B", runs)
    assert row == ("| nano | 0.2B | 50.00 | 80.00 / 70.00 | 75.12 | 81.00 / 79.50 |  |  | 95.61 | "
                   "`medmoe eval --data a`<br>`medmoe eval --data b`<br>`medmoe eval --data c` |")


def test_interval_row():
    from medmoe.evaluation.report import interval_row

    vqa = {"open": {"recall": 24.5531, "ci95": {"recall": [19.2828, 30.3738]}},
           "closed": {"accuracy": 59.1912, "ci95": {"accuracy": [53.3088, 64.7059]}}}
    loglik = {"accuracy": 95.8015, "accuracy_ci95": [94.0840, 97.5191],
              "balanced_accuracy": 93.06, "balanced_accuracy_ci95": [89.78, 95.65]}
    runs = [{"vqa": {"by": {"dataset": {"vqa-rad": vqa}}}},
            {"classification": {"pneumoniamnist": {"loglik": loglik, "generate": {"accuracy": 1.0}}}}]
    assert interval_row("nano", runs) == ("| nano | 24.55 [19.28, 30.37] | 59.19 [53.31, 64.71] |  |  |  |  | "
                                          "95.80 [94.08, 97.52] | 93.06 [89.78, 95.65] |")


def test_score_report(tmp_path):
    import json

    from medmoe.cli import main

    gt = tmp_path / "gt.jsonl"
    gt.write_text(json.dumps({"id": "1", "question": "q?", "answer": "yes", "answer_type": "CLOSED"}) + "\n")
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"question_id": "1", "text": "eyes"}) + "\n")
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--report", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| total | 1 | 0 | - | 1 | 100.00 | 0.00 |" in text and "Routing" not in text
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "metrics.json").exists()
