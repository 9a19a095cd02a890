"""`medmoe demo --tiny`: every phase, evaluation and an answer, in seconds; it refuses to delete a
folder that is not a previous demo."""

from __future__ import annotations

import json

from train_helpers import one_thread


def test_demo_tiny_runs_everything(tmp_path, capsys):
    from medmoe.cli import main

    out = tmp_path / "demo"
    with one_thread():
        assert main(["demo", "--tiny", "--steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny" in text and "answer" in text and str(out) in text
    summary = json.load(open(out / "summary.json"))
    assert set(summary["seconds"]) == {"1", "2", "router", "3", "eval"}
    assert isinstance(summary["answer"], str)
    assert summary["eval"]["counts"]["scored"] == 19
    for phase in ("phase1", "phase2", "phase3"):
        assert (out / phase / "model" / "model.safetensors").exists()
        assert (out / phase / "loss.png").exists()
        assert not (out / phase / "checkpoints").exists()  # the demo keeps no checkpoints
    with one_thread():  # a second demo replaces the first
        assert main(["demo", "--tiny", "--steps", "1", "--out", str(out)]) == 0


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    from medmoe.cli import main

    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--tiny", "--out", str(tmp_path)]) == 2
    assert "not a previous demo" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").exists()
