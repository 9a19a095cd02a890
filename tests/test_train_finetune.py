"""`medmoe finetune`: a trained model learns on new data, only in what its last phase trained;
it refuses to overwrite a run without --resume, and resumes with it."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import one_thread

from medmoe.cli import main
from medmoe.errors import ConfigError
from medmoe.loading import load_model
from medmoe.model.pretrained import build_model
from medmoe.training.recipe import phase_recipe

QUICK = ["--data", "sample", "--batch-size", "2", "max_steps=2", "save_every=1"]


def saved(tmp_path, moe: bool):
    model, processor = build_model("tiny")
    if moe:
        model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    folder = tmp_path / "start"
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_finetune_a_med_moe_model_trains_its_experts_only(tmp_path, capsys):
    start, before = saved(tmp_path, moe=True)
    out = tmp_path / "ft"
    with one_thread():
        assert main(["finetune", "--model", str(start), "--out", str(out), *QUICK]) == 0
    model, _ = load_model(str(out / "model"))
    assert model.is_moe
    moved = changed(before, model.state_dict())
    assert moved and all(".mlp." in k for k in moved), sorted(moved)  # experts and the meta expert
    assert any("experts" in k for k in moved)
    assert not any("router" in k or "projector" in k or "embed" in k for k in moved)
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 2 and summary["finetune"]["model"] == str(start)
    assert (out / "loss.png").exists()
    # A second run into the same folder asks for --resume instead of overwriting; with it, resumes.
    with one_thread():
        assert main(["finetune", "--model", str(start), "--out", str(out), *QUICK]) == 2
        assert "--resume" in capsys.readouterr().err
        assert main(["finetune", "--model", str(start), "--out", str(out), "--resume", *QUICK]) == 0


def test_finetune_a_dense_model_trains_what_phase_2_trains(tmp_path):
    start, before = saved(tmp_path, moe=False)
    with one_thread():
        assert main(["finetune", "--model", str(start), "--out", str(tmp_path / "ft"), "--train-router", *QUICK]) == 2
        assert main(["finetune", "--model", str(start), "--out", str(tmp_path / "ft"), *QUICK]) == 0
    model, _ = load_model(str(tmp_path / "ft" / "model"))
    moved = changed(before, model.state_dict())
    assert any("projector" in k for k in moved) and any("language_model" in k for k in moved)
    assert not any("vision_tower" in k for k in moved)


def test_finetune_settings_are_checked():
    phase = phase_recipe({"data": ["sample"], "epochs": 2}, ["lr=1e-4", "grad_accum=4"])
    assert phase.lr == 1e-4 and phase.grad_accum == 4 and phase.epochs == 2.0
    with pytest.raises(ConfigError, match="flat keys"):
        phase_recipe({}, ["phase3.lr=1e-4"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        phase_recipe({}, ["learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="grad_accum"):
        phase_recipe({}, ["grad_accum=many"])
    with pytest.raises(ConfigError, match="grad_checkpointing='often'"):
        phase_recipe({}, ["grad_checkpointing=often"])
    assert phase_recipe({}, ["grad_checkpointing=selective"]).grad_checkpointing == "selective"


def test_finetune_can_train_the_image_path_of_a_med_moe_model(tmp_path):
    start, before = saved(tmp_path, moe=True)
    out = tmp_path / "ft"
    with one_thread():
        assert main(["finetune", "--model", str(start), "--out", str(out), "--train-projector", "--train-vision",
                     *QUICK]) == 0
    model, _ = load_model(str(out / "model"))
    moved = changed(before, model.state_dict())
    assert any("projector" in k for k in moved) and any("vision_tower" in k for k in moved)
    assert any("experts" in k for k in moved)
    assert not any("router" in k or "embed" in k for k in moved)
    assert not any("running_" in k for k in moved)  # BatchNorm statistics stay those of the model's training
    summary = json.load(open(out / "summary.json"))
    assert summary["finetune"]["train_projector"] and summary["finetune"]["train_vision"]


def test_finetune_with_the_label_loss_teaches_the_projector_and_drops_its_heads(tmp_path, capsys):
    start, before = saved(tmp_path, moe=True)
    out = tmp_path / "ft"
    labelled = [*QUICK, "label_loss_weight=1", "label_loss_min_count=1", "log_every=1"]
    with one_thread():
        assert main(["finetune", "--model", str(start), "--out", str(out), *labelled]) == 2  # the projector is frozen
        assert "--train-projector" in capsys.readouterr().err
        assert main(["finetune", "--model", str(start), "--out", str(out), "--train-projector", *labelled]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["label_loss"] > 0 for r in rows)
    summary = json.load(open(out / "summary.json"))
    assert summary["label_loss_images"] and summary["finetune"]["phase"]["label_loss_weight"] == 1
    model, _ = load_model(str(out / "model"))
    assert not hasattr(model, "label_heads")
    assert not any("label_heads" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(before)
    assert any("projector" in k for k in changed(before, model.state_dict()))
