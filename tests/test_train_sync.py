"""The losses behind the forward select their positions with one host sync each (a read of a
device value waits for the GPU): the same numbers and gradients as selecting by a boolean mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmoe.model.modeling import causal_lm_loss, labelled_positions_loss
from medmoe.training.tower import heads_loss


def test_losses_select_labelled_positions_as_the_boolean_mask_does():
    """One host sync (nonzero) instead of three, the same numbers and gradients, bit for bit."""
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (3, 9))
    labels[labels < 5] = -100
    hidden = torch.randn(3, 9, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    keep = labels[:, 1:] != -100
    old = F.cross_entropy(head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep])
    (old_grad,) = torch.autograd.grad(old, hidden)
    new = labelled_positions_loss(hidden, labels, head)
    (new_grad,) = torch.autograd.grad(new, hidden)
    assert torch.equal(old, new) and torch.equal(old_grad, new_grad)
    logits = head(hidden).detach()
    old = F.cross_entropy(logits[:, :-1][keep].float(), labels[:, 1:][keep])
    assert torch.equal(causal_lm_loss(logits, labels), old)
    nothing = torch.full_like(labels, -100)
    empty = labelled_positions_loss(hidden, nothing, head)
    assert empty.item() == 0.0 and empty.requires_grad


def test_heads_loss_selects_labelled_images_as_the_boolean_mask_does():
    torch.manual_seed(0)
    features = torch.randn(6, 8, requires_grad=True)
    heads = torch.nn.ModuleDict({"organ": torch.nn.Linear(8, 3), "modality": torch.nn.Linear(8, 4)})
    targets = torch.tensor([[0, -100], [2, 1], [-100, 3], [1, -100], [-100, -100], [2, 0]], dtype=torch.float32)
    layout = {"organ": slice(0, 1), "modality": slice(1, 2)}
    loss = heads_loss(heads, layout, features, targets)
    expected = []
    for family, head in heads.items():
        t = targets[:, layout[family]]
        known = t[:, 0] != -100
        expected.append(F.cross_entropy(head(features[known]), t[known, 0].long()))
    assert torch.equal(loss, torch.stack(expected).mean())
    unlabelled = targets.clone()
    unlabelled[:, 1] = -100  # a family without a label in the batch stays in the graph at no cost
    assert torch.equal(heads_loss(heads, layout, features, unlabelled), expected[0])
