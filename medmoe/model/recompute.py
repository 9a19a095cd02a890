"""Which activations a checkpointed decoder layer keeps for backward, and which it recomputes.

Full checkpointing keeps only each layer's input and reruns the whole layer in backward: about a
third more FLOPs. Selective checkpointing keeps the outputs of the expensive ops (matrix products,
grouped expert products, attention) and recomputes only the cheap ones between them (norms,
activations, rotary embedding, routing and permutes), so backward reruns almost no FLOPs while
the wide elementwise intermediates (the FFN's activation output) are still dropped.

    model.gradient_checkpointing_enable(selective=True)

The third way, `activations` (moe/recompute.py), checkpoints no layer at all: only every FFN's
activation output is recomputed.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(aten, name).default for name in names if hasattr(aten, name)}  # older builds lack some


SAVED_OPS = _saved_ops()


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """`context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`."""
    return create_selective_checkpoint_contexts(_policy)


def checkpointing_options(mode: str, every: int = 1) -> dict:
    """A recipe's `grad_checkpointing` mode ("full", "selective" or "activations"; training/recipe.py
    reads and checks it) and `grad_checkpointing_every` as gradient_checkpointing_enable's keyword arguments."""
    if mode == "selective":
        return {"every": 1, "selective": True}
    if mode == "activations":
        return {"activations": True}
    return {"every": every, "selective": False}


def checkpoint_kwargs(selective: bool) -> dict:
    kwargs = {"use_reentrant": False}
    if selective:
        kwargs["context_fn"] = selective_context_fn
    return kwargs
