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
