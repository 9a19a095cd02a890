"""Inference on a GPU: the dense parts of a batch-1 decode step on kernels made for one token.

A batch-1 decode step reads every activated weight once; the time goes to how fast each read runs.
Two swaps, both leaving the weights and the outputs (to rounding) as they were:

- every `nn.Linear` of the decoder layers runs a single row through the split-K matrix-vector
  kernel of the MoE experts (`moe.kernels.linear_matvec`: on the H200 cuBLAS read the attention
  projections at half the copy bandwidth), and any other input through `F.linear` as before;
- attention for one new token runs the split-key kernel of `decode_attention.py`.

    use_decode_kernels(model.language_model)    # load_for_inference does it on a GPU
    drop_decode_kernels(model.language_model)   # back to plain nn.Linear and the previous attention

On the CPU both swaps change nothing: the kernels apply only to CUDA tensors with Triton installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import kernels
from . import decode_attention

MATVEC_MAX_ROWS = 1  # a dense weight is read once per row: beyond one row cuBLAS's GEMM reads it once


class MatvecLinear(nn.Linear):
    """An nn.Linear whose single-row inputs go through the matrix-vector kernel (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= MATVEC_MAX_ROWS * self.in_features and not torch.is_grad_enabled() and kernels.triton_ready(x):
            return kernels.linear_matvec(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _decoder_linears(lm: nn.Module):
    """Plain nn.Linear modules inside the decoder layers (not the LM head, not LoRA-wrapped ones)."""
    head = lm.get_output_embeddings()
    for name, module in lm.named_modules():
        if type(module) is nn.Linear and module is not head and ".layers." in f".{name}":
            yield module


def use_decode_kernels(lm: nn.Module) -> int:
    """Switch `lm` (a transformers causal LM) to the decode kernels; returns how many linears changed.
    The class swap keeps each module's parameters, hooks and state-dict keys."""
    count = 0
    for module in _decoder_linears(lm):
        module.__class__ = MatvecLinear
        count += 1
    if lm.config._attn_implementation != decode_attention.ATTENTION_NAME:
        lm._attn_before_decode_kernels = lm.config._attn_implementation
        lm.set_attn_implementation(decode_attention.register())
    return count


def drop_decode_kernels(lm: nn.Module) -> int:
    """Undo `use_decode_kernels`; returns how many linears went back to nn.Linear."""
    count = 0
    for module in lm.modules():
        if type(module) is MatvecLinear:
            module.__class__ = nn.Linear
            count += 1
    before = getattr(lm, "_attn_before_decode_kernels", None)
    if before is not None:
        lm.set_attn_implementation(before)
        del lm._attn_before_decode_kernels
    return count


def uses_decode_kernels(lm: nn.Module) -> bool:
    return any(type(m) is MatvecLinear for m in lm.modules())
