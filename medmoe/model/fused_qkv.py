"""Inference only: each attention layer's query, key and value projections as one matrix product.

A decode step at batch 1 reads every weight once, and three matrix-vector products over a layer's
input run at a fraction of the bandwidth that one product over the three weights stacked reaches
(docs/speed.md: on the H200 the attention projections ran at about half the copy bandwidth).
transformers' attention modules (Llama, Phi, StableLM, Qwen2, ...) call `q_proj`, `k_proj` and
`v_proj` in that order on the same input, so `q_proj` becomes the fused product and hands the key
and value parts over to `k_proj` and `v_proj`, which return them: the attention code is untouched.

    fuse_qkv(model)     # after merging LoRA adapters; load_for_inference does it on a GPU
    unfuse_qkv(model)   # the three projections back, e.g. before save_pretrained
"""

from __future__ import annotations

import torch
from torch import nn


class _Handoff:
    """The key and value parts of the fused product, until k_proj and v_proj take them."""

    def __init__(self):
        self.k = self.v = None


class FusedQKV(nn.Module):
    """Stands in for `q_proj`: one linear over [W_q; W_k; W_v], returns the query part."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, handoff: _Handoff):
        super().__init__()
        parts = (q, k, v)
        self.sizes = [p.out_features for p in parts]
        self.linear = nn.Linear(q.in_features, sum(self.sizes), bias=any(p.bias is not None for p in parts),
                                device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([p.weight for p in parts]))
            if self.linear.bias is not None:  # a projection without bias adds zeros
                self.linear.bias.copy_(torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                                                  for p in parts]))
        self.had_bias = [p.bias is not None for p in parts]
        self.handoff = handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.linear(x).split(self.sizes, dim=-1)
        self.handoff.k, self.handoff.v = k, v
        return q

    def unfused(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        weights = self.linear.weight.split(self.sizes)
        biases = self.linear.bias.split(self.sizes) if self.linear.bias is not None else (None,) * 3
        out = []
        for w, b, had_bias in zip(weights, biases, self.had_bias):
            linear = nn.Linear(w.shape[1], w.shape[0], bias=had_bias, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if had_bias:
                    linear.bias.copy_(b)
            out.append(linear)
        return tuple(out)


class HandedOver(nn.Module):
    """Stands in for `k_proj` / `v_proj`: returns its part of the product `q_proj` just ran."""

    def __init__(self, handoff: _Handoff, part: str):
        super().__init__()
        self.handoff, self.part = handoff, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.handoff, self.part)
        if out is None:
            raise RuntimeError(f"{self.part}_proj ran before q_proj: this attention module calls its projections in "
                               "another order; load the model with fuse_qkv=False")
        setattr(self.handoff, self.part, None)  # each product is used once
        return out


def _attention_modules(model: nn.Module):
    for module in model.modules():
        projections = [getattr(module, f"{p}_proj", None) for p in "qkv"]
        if all(type(p) is nn.Linear for p in projections) and len({p.in_features for p in projections}) == 1:
            yield module


def fuse_qkv(model: nn.Module) -> int:
    """Fuse every attention layer whose q/k/v projections are plain linears on one input (LoRA-
    wrapped or quantised ones are left alone); returns how many were fused."""
    fused = 0
    for attn in list(_attention_modules(model)):
        handoff = _Handoff()
        attn.q_proj = FusedQKV(attn.q_proj, attn.k_proj, attn.v_proj, handoff)
        attn.k_proj, attn.v_proj = HandedOver(handoff, "k"), HandedOver(handoff, "v")
        fused += 1
    return fused


def unfuse_qkv(model: nn.Module) -> int:
    """Undo `fuse_qkv`: the three projections with their own weights again."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "q_proj", None), FusedQKV):
            module.q_proj, module.k_proj, module.v_proj = module.q_proj.unfused()
            count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedQKV) for m in model.modules())
