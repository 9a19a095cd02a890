"""Inference only: the matrix products of a layer that read the same input, as one product.

A decode step at batch 1 reads every weight once, and several matrix-vector products over a
layer's input run at a fraction of the bandwidth that one product over their weights stacked
reaches (docs/speed.md: on an H200 the three attention projections run at about half the copy
bandwidth).

- Every architecture: transformers' attention modules (Llama, Phi, StableLM, Qwen2, ...) call
  `q_proj`, `k_proj` and `v_proj` in that order on the same input, so `q_proj` becomes the fused
  product and hands the key and value parts over to `k_proj` and `v_proj`, which return them: the
  attention code is untouched.
- Phi's parallel block, `x + attn(ln(x)) + ffn(ln(x))` (`parallel=True`): the FFN's first
  projection reads the same input too, so it joins the product (its part is handed to `fc1`), and
  the attention's output projection and the FFN's second one are one product over the two inputs
  side by side, `[attn, act(h)] @ [W_dense | W_fc2]^T + (b_dense + b_fc2)`: `dense` hands its input
  to `fc2` and returns zeros, which the block adds as it added the attention output. The FFN is
  the layer's MLP or, in a Med-MoE layer, its meta expert (the routed experts stay apart). Six
  products per layer become two. In a Med-MoE layer the fused input product also starts the
  routed experts on a second CUDA stream (`engine/overlap.py`, `overlap_experts=True`): they read the
  same input, and run beside the attention instead of after it.

At one row on a GPU (a batch-1 decode step) the fused products run through a matrix-vector
kernel (`moe/kernels.py: linear`) that reads their weights nearer the copy bandwidth than cuBLAS.

The modules standing in for the projections are put in place once, by `engine.prepare` (or
`fuse_qkv` directly), and say so (`inference_only`): a prepared model is not saved as it is.

    fuse_qkv(model)     # after merging LoRA adapters; engine.prepare does it
    unfuse_qkv(model)   # the separate projections back, e.g. before save_pretrained
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe import MedMoEBlock, kernels
from .overlap import OverlappedMoE


class _Handoff:
    """The parts of a fused product, until the modules standing in for their projections take them."""

    def __init__(self):
        self.k = self.v = self.fc1 = self.attn = None

    def take(self, part: str, taker: str, giver: str) -> torch.Tensor:
        out = getattr(self, part)
        setattr(self, part, None)  # each product is used once
        if out is None:
            raise RuntimeError(f"{taker} ran before {giver}: this model calls its projections in another order; "
                               "load the model with fuse_qkv=False")
        return out


def _stacked_linear(parts: list[nn.Linear], dim: int) -> nn.Linear:
    """One linear over the weights of `parts` stacked along `dim` (0: outputs, 1: inputs); its bias
    is the parts' biases stacked (dim 0) or summed (dim 1); a part without bias adds zeros."""
    weight = torch.cat([p.weight for p in parts], dim)
    ref = parts[0].weight
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=any(p.bias is not None for p in parts),
                       device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            biases = [p.bias for p in parts if p.bias is not None]
            linear.bias.copy_(torch.stack(biases).float().sum(0) if dim == 1 else
                              torch.cat([p.bias if p.bias is not None else ref.new_zeros(p.out_features) for p in parts]))
    return linear


def _product(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x): a plain nn.Linear through kernels.linear (its one-row kernel on a GPU); anything
    else (an int8 replacement, serving/quantize.py) as it is."""
    return kernels.linear(x, linear.weight, linear.bias) if type(linear) is nn.Linear else linear(x)


def _split_linear(linear: nn.Linear, sizes: list[int], biases: list[torch.Tensor | None], dim: int) -> list[nn.Linear]:
    """The inverse of _stacked_linear: the parts of the weight along `dim`, each with its bias."""
    out = []
    for w, b in zip(linear.weight.split(sizes, dim), biases):
        part = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            part.weight.copy_(w)
            if b is not None:
                part.bias.copy_(b)
        out.append(part)
    return out


class FusedQKV(nn.Module):
    """Stands in for `q_proj`: one linear over [W_q; W_k; W_v (; W_fc1)], returns the query part and
    hands the others over."""

    inference_only = True

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, handoff: _Handoff, fc1: nn.Linear | None = None,
                 moe: OverlappedMoE | None = None):
        super().__init__()
        object.__setattr__(self, "moe", moe)  # a reference: the layer owns it
        parts = [q, k, v] + ([fc1] if fc1 is not None else [])
        self.names = ["q", "k", "v", "fc1"][: len(parts)]
        self.sizes = [p.out_features for p in parts]
        self.had_bias = [p.bias is not None for p in parts]
        self.linear = _stacked_linear(parts, dim=0)
        self.handoff = handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = None
        if self.moe is not None and type(self.linear) is nn.Linear:
            # the block's experts, launched on a side stream to run beside this layer's attention
            product = self.moe.start(x, self.linear.weight, self.linear.bias)
        if product is None:
            product = _product(self.linear, x)
        q, *rest = product.split(self.sizes, dim=-1)
        for name, part in zip(self.names[1:], rest):
            setattr(self.handoff, name, part)
        return q

    def unfused(self) -> list[nn.Linear]:
        bias = self.linear.bias.split(self.sizes) if self.linear.bias is not None else [None] * len(self.sizes)
        return _split_linear(self.linear, self.sizes, [b if had else None for b, had in zip(bias, self.had_bias)], dim=0)


class HandedOver(nn.Module):
    """Stands in for `k_proj` / `v_proj` / `fc1`: returns its part of the product `q_proj` just ran
    (in the caller's layout: a Med-MoE block flattens the tokens)."""

    inference_only = True

    def __init__(self, handoff: _Handoff, part: str):
        super().__init__()
        self.handoff, self.part = handoff, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.handoff.take(self.part, f"{self.part}_proj" if self.part in "kv" else self.part, "q_proj")
        return out.reshape(*x.shape[:-1], out.shape[-1])


class DeferredDense(nn.Module):
    """Stands in for Phi's attention `dense`: hands its input to the FFN's `fc2`, which applies both
    output projections in one product, and returns zeros for the block to add."""

    inference_only = True

    def __init__(self, out_features: int, handoff: _Handoff):
        super().__init__()
        self.out_features, self.handoff = out_features, handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("the fused projections are for inference (dropout would apply to the wrong "
                               "tensor): call unfuse_qkv(model) before training")
        self.handoff.attn = x
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


class ParallelOut(nn.Module):
    """Stands in for the FFN's `fc2`: [attention output, act(h)] @ [W_dense | W_fc2]^T + both biases."""

    inference_only = True

    def __init__(self, dense: nn.Linear, fc2: nn.Linear, handoff: _Handoff):
        super().__init__()
        self.sizes = [dense.in_features, fc2.in_features]
        self.linear = _stacked_linear([dense, fc2], dim=1)
        self.handoff = handoff
        for name, part in (("dense_bias", dense), ("fc2_bias", fc2)):  # for unfused(): a sum does not split
            self.register_buffer(name, part.bias.detach().clone() if part.bias is not None else None, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        attn = self.handoff.take("attn", "fc2", "the attention's dense")
        return _product(self.linear, torch.cat([attn.reshape(*h.shape[:-1], attn.shape[-1]), h], dim=-1))

    def unfused(self) -> list[nn.Linear]:
        return _split_linear(self.linear, self.sizes, [self.dense_bias, self.fc2_bias], dim=1)


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _attention_modules(model: nn.Module):
    for module in model.modules():
        projections = [getattr(module, f"{p}_proj", None) for p in "qkv"]
        if _plain(*projections) and len({p.in_features for p in projections}) == 1:
            yield module


def _parallel_ffn(layer: nn.Module) -> nn.Module | None:
    """The FFN whose fc1/fc2 join the attention's products, for a Phi-style parallel layer (one
    input norm, attention with `dense`): the MLP, or a Med-MoE block's meta expert; else None."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if (attn is None or mlp is None or not hasattr(layer, "input_layernorm") or hasattr(layer, "post_attention_layernorm")
            or not _plain(*(getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "dense")))):
        return None
    ffn = getattr(mlp, "meta", mlp)
    if ffn is None or getattr(getattr(mlp, "experts", None), "shared", None) is ffn:  # LoRA experts read the meta FFN's weights
        return None
    if not _plain(getattr(ffn, "fc1", None), getattr(ffn, "fc2", None)) or not hasattr(ffn, "activation_fn"):
        return None
    return ffn


def _same_mode(module: nn.Module) -> None:
    module.train(module.training)  # the new modules take the train/eval mode of the one they joined


def fuse_qkv(model: nn.Module, parallel: bool = True, overlap_experts: bool = True) -> int:
    """Fuse every attention layer whose q/k/v projections are plain linears on one input (LoRA-
    wrapped or quantised ones are left alone) and, with `parallel`, the FFN projections of Phi's
    parallel layers as well, whose Med-MoE experts then start beside the attention unless not
    `overlap_experts`; returns how many attention layers were fused."""
    fused = 0
    for layer in list(model.modules()) if parallel else []:
        ffn = _parallel_ffn(layer)
        if ffn is None:
            continue
        attn, handoff, moe = layer.self_attn, _Handoff(), None
        if overlap_experts and isinstance(layer.mlp, MedMoEBlock):
            layer.mlp = moe = OverlappedMoE(layer.mlp)
        attn.q_proj = FusedQKV(attn.q_proj, attn.k_proj, attn.v_proj, handoff, fc1=ffn.fc1, moe=moe)
        attn.k_proj, attn.v_proj, ffn.fc1 = HandedOver(handoff, "k"), HandedOver(handoff, "v"), HandedOver(handoff, "fc1")
        ffn.fc2 = ParallelOut(attn.dense, ffn.fc2, handoff)
        attn.dense = DeferredDense(attn.dense.out_features, handoff)
        _same_mode(layer)
        fused += 1
    for attn in list(_attention_modules(model)):
        handoff = _Handoff()
        attn.q_proj = FusedQKV(attn.q_proj, attn.k_proj, attn.v_proj, handoff)
        attn.k_proj, attn.v_proj = HandedOver(handoff, "k"), HandedOver(handoff, "v")
        _same_mode(attn)
        fused += 1
    return fused


def unfuse_qkv(model: nn.Module) -> int:
    """Undo `fuse_qkv`: every projection with its own weights again, each MoE block in its layer."""
    count = 0
    for layer in list(model.modules()):
        attn = getattr(layer, "self_attn", None)
        attn = getattr(attn, "attn", attn)  # inside engine/decode_attention.py's module, if there is one
        if isinstance(getattr(attn, "dense", None), DeferredDense):
            if isinstance(layer.mlp, OverlappedMoE):
                layer.mlp = layer.mlp.block
            ffn = layer.mlp.meta if hasattr(layer.mlp, "meta") else layer.mlp
            attn.q_proj, attn.k_proj, attn.v_proj, ffn.fc1 = attn.q_proj.unfused()
            attn.dense, ffn.fc2 = ffn.fc2.unfused()
            count += 1
    for module in model.modules():
        if isinstance(getattr(module, "q_proj", None), FusedQKV):
            module.q_proj, module.k_proj, module.v_proj = module.q_proj.unfused()
            count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedQKV) for m in model.modules())


def count_parallel(model: nn.Module) -> int:
    """How many layers run their FFN projections fused with the attention's (fuse_qkv(parallel=True))."""
    return sum(isinstance(m, ParallelOut) for m in model.modules())
