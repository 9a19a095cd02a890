"""The answer loss against rotated images (training/image_contrast.py): its value and cap, the
batches it leaves alone, its settings, and a fine-tune that uses it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from train_helpers import one_thread, samples

from medmoe.data.dataset import Collate
from medmoe.errors import ConfigError
from medmoe.training.distributed import single_process
from medmoe.training.image_contrast import ImageContrast, setup
from medmoe.training.recipe import load_recipe


def batch_of(processor, n=4):
    return Collate(processor)(samples(processor, n=n))


def answer_loss(model, batch, pixels):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                 labels=batch["labels"], return_logits=False).loss


def test_the_term_is_the_answer_loss_with_each_image_moved_to_the_next_question(tiny):
    model, processor = tiny
    batch = batch_of(processor)
    rotated = torch.cat([batch["pixel_values"][-1:], batch["pixel_values"][:-1]])
    with one_thread(), torch.no_grad():
        wrong = answer_loss(model, batch, rotated)
        right = answer_loss(model, batch, batch["pixel_values"])
        term = ImageContrast(weight=0.5, cap=100.0)(model, batch)["image_contrast"]
    assert not torch.allclose(wrong, right)  # the rotation changes what the model sees
    torch.testing.assert_close(term, -0.5 * wrong)


def test_the_cap_stops_the_gradient(tiny):
    model, processor = tiny
    batch = batch_of(processor)
    with one_thread():
        term = ImageContrast(weight=1.0, cap=1e-6)(model, batch)["image_contrast"]
        assert term.item() == pytest.approx(-1e-6)
        term.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    with one_thread():
        ImageContrast(weight=1.0, cap=100.0)(model, batch)["image_contrast"].backward()
    assert any(p.grad is not None and p.grad.any() for p in model.projector.parameters())


def test_batches_it_cannot_rotate_add_nothing(tiny):
    model, processor = tiny
    contrast = ImageContrast(weight=1.0, cap=2.0)
    one = batch_of(processor, n=1)
    assert contrast(model, one) == {}
    text_only = dict(batch_of(processor, n=2), pixel_values=None)
    assert contrast(model, text_only) == {}


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="image_contrast_weight=-1"):
        load_recipe("tiny", ["phase3.image_contrast_weight=-1"])
    with pytest.raises(ConfigError, match="image_contrast_cap=0"):
        load_recipe("tiny", ["phase2.image_contrast_cap=0"])
    assert setup(0.0, 2.0, "phase2", single_process()) == []
    assert len(setup(0.5, 2.0, "phase2", single_process())) == 1
    with pytest.raises(ConfigError, match="one process"):
        setup(0.5, 2.0, "phase2", dataclasses.replace(single_process(), world=2))


def test_a_fine_tune_with_it_logs_the_term(tmp_path):
    from medmoe.cli import main
    from medmoe.model.pretrained import build_model

    model, processor = build_model("tiny")
    model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    model.save_pretrained(str(tmp_path / "start"))
    processor.save_pretrained(str(tmp_path / "start"))
    out = tmp_path / "ft"
    with one_thread():
        assert main(["finetune", "--model", str(tmp_path / "start"), "--out", str(out), "--data", "sample",
                     "--batch-size", "4", "max_steps=2", "log_every=1", "image_contrast_weight=0.5"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(-0.5 * 2.0 <= r["image_contrast"] < 0 for r in rows)
