"""Frozen linear weights cast once for a bf16 phase (training/frozen_weights.py): the same loss and
gradients as autocast casting them every call, and the float32 originals back afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medmoe.model.pretrained import build_model
from medmoe.training import params
from medmoe.training.frozen_weights import castable_frozen, frozen_weights_in


def test_only_frozen_weights_that_linear_layers_alone_use_are_cast():
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight  # tied, as SmolLM2's output layer: the lookup is not cast by autocast
    frozen, trained, norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)
    model = nn.Sequential(embed, frozen, trained, norm, head)
    for p in [*embed.parameters(), *frozen.parameters(), *norm.parameters()]:
        p.requires_grad_(False)
    assert {id(p) for p in castable_frozen(model)} == {id(frozen.weight), id(frozen.bias)}
    with frozen_weights_in(model, torch.bfloat16) as count:
        assert count == 2 and frozen.weight.dtype == torch.bfloat16
        assert embed.weight.dtype == trained.weight.dtype == norm.weight.dtype == torch.float32
    assert frozen.weight.dtype == torch.float32
    with frozen_weights_in(model, None) as count:
        assert count == 0


def _batch(model, rows: int = 2, length: int = 40):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (rows, length), generator=g)
    n, size = model.config.vision_config.num_tokens, model.config.vision_config.image_size
    ids[:, 2:2 + n] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :2 + n] = -100
    pixels = torch.randn(rows, 3, size, size, generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=labels)


def _step(model, groups, batch, cast: bool):
    model.zero_grad(set_to_none=True)
    with frozen_weights_in(model, torch.bfloat16 if cast else None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, return_logits=False).loss
        loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for g in groups.values() for n, p in g.items()}


def same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("phase", ["2", "3"])
def test_a_bf16_step_gives_the_same_loss_and_gradients_and_the_weights_come_back(phase):
    torch.manual_seed(0)
    model, _ = build_model("tiny")
    model.train()
    if phase == "2":
        model.add_llm_lora(rank=4, alpha=8)
        groups = params.phase2_groups(model, train_vision=False)
    else:
        model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
        groups = params.phase3_groups(model)
    groups = params.select(model, groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert castable_frozen(model)  # the test means something: there are weights to cast
    batch = _batch(model)
    torch.manual_seed(1)
    loss, grads = _step(model, groups, batch, cast=False)
    torch.manual_seed(1)
    cast_loss, cast_grads = _step(model, groups, batch, cast=True)
    assert torch.equal(loss, cast_loss)
    assert grads.keys() == cast_grads.keys() and all(same(grads[n], cast_grads[n]) for n in grads)
    assert any(g is not None for g in grads.values())
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
