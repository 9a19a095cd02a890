"""Image-level labels as an auxiliary loss in phases 1 and 2: where its gradient goes, images
without labels, a phase that uses it (heads dropped from the model, exact resume), beside the
contrastive loss, and its settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from medmoe.data.records import UNKNOWN
from medmoe.errors import ConfigError
from medmoe.training.label_loss import HEAD, LabelLoss, setup
from medmoe.training.recipe import load_recipe

from train_helpers import logged, one_thread, phase1_run, resumes_exactly


def sample_records():
    from medmoe.training.data import load_records

    return load_records(["sample"])  # 12 images, 4 questions each; modality and organ, 3 classes each


def one_per_image(records) -> list[int]:
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r.image, i)
    return list(first.values())


def test_the_loss_trains_heads_projector_and_tower_not_the_llm(tiny):
    from medmoe.training.data import Collate, records_dataset

    model, processor = tiny
    records = sample_records()
    loss_fn = LabelLoss(records, weight=1.0, min_count=2)
    assert set(loss_fn.classes) == {"modality", "organ"} and loss_fn.counts() == {"modality": 12, "organ": 12}
    before = torch.random.get_rng_state()
    loss_fn.attach(model, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the phase's dropout draws as without the loss
    model.vision_tower.freeze(False)
    batch = Collate(processor)([records_dataset(records, processor, "medmoe", 512)[i] for i in one_per_image(records)[:6]])
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
          labels=batch["labels"])
    loss = loss_fn(model, batch)["label_loss"]
    assert loss > 0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[f"{HEAD}.{f}.weight"].abs().sum() > 0 for f in ("modality", "organ"))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("projector."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("vision_tower."))
    assert all(g is None for n, g in grads.items() if n.startswith("language_model."))  # the LM loss was not backpropagated
    loss_fn.remove(model)
    assert not hasattr(model, HEAD) and not any(k.startswith(HEAD) for k in model.state_dict())


def test_images_without_a_label_add_nothing(tiny):
    model, _ = tiny
    records = sample_records()
    images = [records[i].image for i in one_per_image(records)]
    # Image 0 loses both labels; image 1 keeps its organ only.
    blank = {images[0]: {"modality": UNKNOWN, "meta": {}}, images[1]: {"modality": UNKNOWN}}
    records = [dataclasses.replace(r, **blank.get(r.image, {})) for r in records]
    loss_fn = LabelLoss(records, weight=1.0, min_count=2)
    assert loss_fn.counts() == {"modality": 10, "organ": 11}
    loss_fn.attach(model, seed=0)
    ids = [next(r.id for r in records if r.image == image) for image in images[:4]]
    tokens = torch.randn(4, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def loss(rows):
        loss_fn._keep(None, None, tokens[rows])
        return loss_fn(model, {"ids": [ids[r] for r in rows]})["label_loss"]

    loss([0, 1, 2, 3]).backward()
    assert tokens.grad[0].abs().sum() == 0  # no label: no gradient
    assert tokens.grad[1].abs().sum() > 0 and tokens.grad[2].abs().sum() > 0
    # Image 1 has no modality: the modality term is the same with or without it.
    heads = getattr(model, HEAD)
    targets = loss_fn.targets[[loss_fn.row[image] for image in images[:4]]]
    pooled = tokens.detach().mean(1)
    modality = torch.nn.functional.cross_entropy(heads["modality"](pooled[2:]), targets[2:, 0].long())
    organ = torch.nn.functional.cross_entropy(heads["organ"](pooled[1:]), targets[1:, 1].long())
    assert torch.allclose(loss([0, 1, 2, 3]).detach(), (modality + organ) / 2)
    assert loss([0]) == 0  # a batch without any label gives zero


def test_a_phase_logs_the_label_loss_drops_its_heads_and_resumes_exactly(tmp_path):
    whole, rows = resumes_exactly(tmp_path, ["phase1.label_loss_weight=0.5", "phase1.label_loss_min_count=2"])
    assert len(rows) == 4 and all(r["label_loss"] > 0 for r in rows)
    assert all(r["loss"] > r["label_loss"] for r in rows)  # the captioning loss is still there
    # the heads train with the phase and are checkpointed with it; the model never holds them
    assert not any(k.startswith(HEAD) for k in load_file(whole / "model" / "model.safetensors"))
    checkpoint = next((whole / "checkpoints").iterdir())
    assert any(k.startswith(HEAD) for k in load_file(checkpoint / "model.safetensors"))
    # One setting changed: the first step's answer loss is the one of the same run without it.
    without = logged(phase1_run(tmp_path / "without", []))
    assert rows[0]["loss"] - rows[0]["label_loss"] == pytest.approx(without[0]["loss"], rel=1e-6)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["trainable"][HEAD] == 2 * (64 * 3 + 3)  # the tiny LLM's d 64 -> 3 modalities, 3 organs
    assert summary["label_loss_images"] == {"modality": 12, "organ": 12}


def test_phase2_with_the_label_and_contrastive_losses_together(tmp_path, monkeypatch):
    from medmoe.training.contrastive import HEAD as CONTRASTIVE_HEAD
    from medmoe.training.phases import run_phase

    from test_train_contrastive import WordVectors

    monkeypatch.setattr("medmoe.vision.text_encoder.load_minilm", lambda device="cpu": WordVectors())
    recipe = load_recipe("tiny", [f"output_dir={tmp_path}", "phase1.max_steps=1", "phase2.max_steps=2",
                                  "phase2.log_every=1", "phase2.train_vision=true", "phase2.label_loss_weight=0.1",
                                  "phase2.label_loss_min_count=2", "phase2.contrastive_weight=0.5"])
    with one_thread():
        run_phase(recipe, "1")
        run_phase(recipe, "2")
    summary = json.loads((tmp_path / "phase2" / "summary.json").read_text())
    assert summary["trainable"][HEAD] > 0 and summary["trainable"][CONTRASTIVE_HEAD] > 0
    last = summary["last"]
    assert last["label_loss"] > 0 and last["contrastive_loss"] > 0
    assert last["loss"] > last["label_loss"] + last["contrastive_loss"]  # the answer loss is the rest
    saved = load_file(tmp_path / "phase2" / "model" / "model.safetensors")
    assert not any(k.startswith((HEAD, CONTRASTIVE_HEAD)) for k in saved)


def test_label_loss_settings_are_checked():
    from medmoe.training.distributed import single_process

    with pytest.raises(ConfigError, match="label_loss_weight=-1"):
        load_recipe("tiny", ["phase2.label_loss_weight=-1"])
    with pytest.raises(ConfigError, match="choose one or more of modality"):
        load_recipe("tiny", ['phase2.label_loss_families=["organs"]'])
    with pytest.raises(ConfigError, match="label_loss_min_count=0"):
        load_recipe("tiny", ["phase1.label_loss_min_count=0"])
    with pytest.raises(ConfigError, match="phase3.label_loss_weight: .*phase 3 freezes"):
        setup(None, [], 0.1, ["modality"], 5, "3", single_process())
    with pytest.raises(ConfigError, match="one process"):
        setup(None, [], 0.1, ["modality"], 5, "2", dataclasses.replace(single_process(), world=2))
    with pytest.raises(ConfigError, match="no label family"):  # the sample holds fewer than 5 images of each class
        LabelLoss(sample_records(), 0.1)
    assert set(LabelLoss(sample_records(), 0.1, ["organ"], min_count=2).classes) == {"organ"}


def test_the_bundled_recipe_changes_one_setting_of_nano():
    nano, variant = load_recipe("nano").to_dict(), load_recipe("nano-label-loss").to_dict()
    assert variant["phase2"].pop("label_loss_weight") == 1.0 and nano["phase2"].pop("label_loss_weight") == 0.0
    assert variant.pop("output_dir") == "runs/nano-label-loss"
    assert variant == {k: v for k, v in nano.items() if k != "output_dir"}


def test_the_loss_follows_the_model_to_its_device_after_attach(tiny, monkeypatch):
    """Phases attach the loss before the trainer moves the model (to the GPU): the targets must
    follow. The meta device stands in for a second device here (the loss itself reads the labelled
    rows back, which meta tensors cannot, so a stand-in takes what it would be given)."""
    model, _ = tiny
    records = sample_records()
    loss_fn = LabelLoss(records, weight=1.0, min_count=2)
    loss_fn.attach(model, seed=0)
    getattr(model, HEAD).to("meta")
    given = {}
    monkeypatch.setattr("medmoe.training.label_loss.heads_loss",
                        lambda heads, layout, features, targets: given.update(targets=targets) or features.sum())
    images = [records[i].image for i in one_per_image(records)][:3]
    ids = [next(r.id for r in records if r.image == image) for image in images]
    loss_fn._keep(None, None, torch.empty(3, 3, model.config.hidden_size, device="meta"))
    loss_fn(model, {"ids": ids})
    assert given["targets"].device.type == "meta" and given["targets"].shape[0] == 3
