"""Frozen weights of linear and convolution layers held in bf16 while a phase trains under bf16
autocast, and put back exactly when it ends.

Autocast runs every linear and convolution in bf16 and casts their weights on each call. A frozen
weight never changes, yet it is cast again every forward (and in a checkpointed layer's
recompute): in nano's phase 2, most of the LLM's weights each step. Casting them once gives the
same bf16 values, so every autocast op computes the same result with fewer copies to launch and
half the memory for those weights. The float32 originals wait on the host and come back when the
phase ends, so the saved model is the one that would have been saved.

Only weights that belong to linear and convolution layers alone are cast: a parameter that
another module also uses (SmolLM2's output layer is its input embedding, whose lookup autocast
does not cast) keeps its dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

CAST_BY_AUTOCAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def castable_frozen(model: nn.Module) -> list[nn.Parameter]:
    """The frozen float32 parameters that only linear and convolution layers use, once each."""
    owners: dict[int, list[nn.Module]] = {}
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
            params[id(param)] = param
    return [p for key, p in params.items()
            if not p.requires_grad and p.dtype == torch.float32
            and all(isinstance(m, CAST_BY_AUTOCAST) for m in owners[key])]


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Inside: the castable frozen weights in `dtype` (None: nothing changes). Yields how many."""
    if dtype is None:
        yield 0
        return
    frozen = castable_frozen(model)
    originals = [p.data if p.device.type == "cpu" else p.data.to("cpu") for p in frozen]  # off the GPU meanwhile
    for p in frozen:
        p.data = p.data.to(dtype)
    try:
        yield len(frozen)
    finally:
        for p, original in zip(frozen, originals):
            p.data = original.to(p.device)
