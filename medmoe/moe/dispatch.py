"""How tokens reach their experts. Dropless: every token is processed, whatever the batch.

- `loop`: one expert at a time over the tokens routed to it. Plain, works for any expert
  module, and is the reference the fast path is tested against. It syncs with the host once
  per expert (to size each group).
- `grouped_ffn`: tokens sorted by expert, both projections as one `torch._grouped_mm` each
  over the stacked [E, ...] weights; group sizes stay on the device (no host sync).
"""

from __future__ import annotations

from typing import Callable

import torch


def loop(x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor, num_experts: int,
         expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    n, k = expert_index.shape
    flat_index = expert_index.reshape(-1)
    flat_weight = expert_weight.reshape(-1)
    token = torch.arange(n, device=x.device).repeat_interleave(k)
    y = torch.zeros_like(x)
    for e in range(num_experts):
        picked = (flat_index == e).nonzero(as_tuple=True)[0]
        if picked.numel() == 0:
            continue
        rows = token[picked]
        out = expert_fn(e, x[rows]) * flat_weight[picked, None].to(x.dtype)
        y.index_add_(0, rows, out)
    return y


def grouped_supported(x: torch.Tensor, experts) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    # Hopper/Blackwell kernels need 16-byte aligned rows.
    return all(s % 8 == 0 for s in (experts.w_in.shape[1], experts.w_in.shape[2], experts.w_out.shape[2]))


def auto_mode(x: torch.Tensor, experts=None) -> str:
    if experts is not None and grouped_supported(x, experts):
        return "grouped"
    return "loop"


def grouped_ffn(x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor, experts) -> torch.Tensor:
    n, k = expert_index.shape
    flat_index = expert_index.reshape(-1)
    order = flat_index.argsort(stable=True)
    sorted_expert = flat_index[order]
    token = order // k
    counts = torch.bincount(flat_index, minlength=experts.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    xs = x[token]
    h = torch._grouped_mm(xs, experts.w_in, offs=offsets)
    if experts.b_in is not None:
        h = h + experts.b_in[sorted_expert]
    h = experts.hidden_act(h)
    out = torch._grouped_mm(h, experts.w_out, offs=offsets)
    if experts.b_out is not None:
        out = out + experts.b_out[sorted_expert]
    out = out * expert_weight.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)
