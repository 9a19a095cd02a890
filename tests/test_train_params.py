"""Each phase changes exactly the parameters it should and leaves every other one bit-identical."""

from __future__ import annotations

import pytest
import torch
from train_helpers import one_thread, samples, state

from medmoe.errors import ConfigError
from medmoe.training import params
from medmoe.training.recipe import PhaseRecipe
from medmoe.training.trainer import train


def _train_few_steps(model, groups, tmp_path, steps=3):
    data = samples(model.test_processor)
    with one_thread():
        train(model, data, groups, PhaseRecipe(lr=1e-2, max_steps=steps, batch_size=4, warmup_ratio=0, log_every=1),
              str(tmp_path), seed=0)


def _check(model, groups, before, after):
    trained = set(params.trainable_names(groups))
    names = {n for n, _ in model.named_parameters()}
    assert trained <= names
    for key in before:
        if key in trained:
            assert not torch.equal(before[key], after[key]), f"{key} should have been trained"
        else:
            assert torch.equal(before[key], after[key]), f"{key} should be untouched"


@pytest.fixture
def tiny_model(tiny):
    model, processor = tiny
    model.test_processor = processor  # plain attribute: not a parameter, not saved
    return model


def test_phase1_trains_projector_only(tiny_model, tmp_path):
    model = tiny_model
    groups = params.select(model, params.phase1_groups(model))
    assert all(n.startswith("projector.") for n in params.trainable_names(groups))
    before = state(model)
    _train_few_steps(model, groups, tmp_path)
    _check(model, groups, before, state(model))


def test_phase2_trains_llm_and_projector_not_vision(tiny_model, tmp_path):
    model = tiny_model
    groups = params.select(model, params.phase2_groups(model))
    names = params.trainable_names(groups)
    assert any(n.startswith("language_model.") for n in names) and any(n.startswith("projector.") for n in names)
    assert not any(n.startswith("vision_tower.") for n in names)
    before = state(model)
    _train_few_steps(model, groups, tmp_path)
    _check(model, groups, before, state(model))


def test_phase2_can_train_the_vision_tower_and_phase3_freezes_it_again(tiny_model, tmp_path):
    model = tiny_model
    groups = params.select(model, params.phase2_groups(model, train_vision=True))
    assert set(groups) == {"llm", "projector", "vision"}
    assert not model.vision_tower.frozen
    model.train()
    assert model.vision_tower.training  # a training tower updates its normalisation statistics
    before = state(model)
    _train_few_steps(model, groups, tmp_path)
    _check(model, groups, before, state(model))  # vision weights changed, as trained
    model.upcycle()
    params.select(model, params.phase3_groups(model))
    model.train()
    assert model.vision_tower.frozen and not model.vision_tower.training
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


@pytest.mark.parametrize("trainable,train_router,expert_type", [
    ("experts", False, "full"), ("official", False, "full"), ("experts", True, "full"), ("experts", False, "lora"),
])
def test_phase3_trains_the_chosen_set(tiny_model, tmp_path, trainable, train_router, expert_type):
    model = tiny_model.upcycle({"expert_type": expert_type, "expert_lora": {"rank": 4, "alpha": 8}})
    groups = params.select(model, params.phase3_groups(model, trainable, train_router=train_router))
    names = params.trainable_names(groups)
    assert any(".experts." in n for n in names)
    assert any(".meta." in n for n in names)
    assert any(n.startswith("router.") for n in names) == train_router
    assert any(n.startswith("projector.") for n in names) == (trainable == "official")
    assert not any("self_attn" in n or "embed" in n or n.startswith("vision_tower.") for n in names)
    before = state(model)
    _train_few_steps(model, groups, tmp_path)
    _check(model, groups, before, state(model))


def test_phase_groups_refuse_the_wrong_model(tiny_model):
    with pytest.raises(ConfigError, match="upcycle"):
        params.phase3_groups(tiny_model)
    tiny_model.upcycle()
    with pytest.raises(ConfigError, match="dense"):
        params.phase2_groups(tiny_model)
    with pytest.raises(ConfigError, match="trainable"):
        params.phase3_groups(tiny_model, "everything")


def test_compact_phases_train_adapters_only(tiny_model, tmp_path):
    """Phase 2 with LLM LoRA trains adapters + projector; phase 3 then trains LoRA experts + the
    meta experts' adapters, so the pretrained LLM weights stay bit-identical throughout."""
    model = tiny_model
    model.add_llm_lora(rank=4, alpha=8)
    groups = params.select(model, params.phase2_groups(model))
    names = params.trainable_names(groups)
    assert names and all(n.endswith(("lora_A", "lora_B")) or n.startswith("projector.") for n in names)
    before = state(model)
    _train_few_steps(model, groups, tmp_path / "p2")
    _check(model, groups, before, state(model))
    model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    groups = params.select(model, params.phase3_groups(model))
    names = params.trainable_names(groups)
    assert any(".experts." in n for n in names) and any(".meta." in n and "lora_" in n for n in names)
    assert not any(n.endswith(".weight") and ".meta." in n for n in names)
    before = state(model)
    _train_few_steps(model, groups, tmp_path / "p3")
    _check(model, groups, before, state(model))
