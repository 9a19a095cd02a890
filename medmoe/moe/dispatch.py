"""How tokens reach their experts. Dropless: every token is processed, whatever the batch
(`capacity_weights` reproduces DeepSpeed's token dropping for converted checkpoints, opt-in).

- `loop`: one expert at a time over the tokens routed to it. Plain, works for any expert
  module, and is the reference the fast path is tested against. It syncs with the host once
  per expert (to size each group).
- `grouped_ffn`: the (token, choice) slots sorted by expert, both projections as one
  `torch._grouped_mm` each over the stacked [E, ...] weights. Every shape depends only on the
  number of tokens, never on the routing, so there is no host sync and the whole block can be
  captured in a CUDA graph (decode) or traced on the meta device (tested).

The meta expert is not fused into the grouped GEMM: it would need an [E+1] weight stack built on
every call (a copy of all expert weights, several times the cost of a decode step) or its weights
moved into the stack (breaking `block.meta`, which is the layer's original FFN module). It runs
as one dense FFN instead (`experts.ffn_forward`); docs/speed.md has the measurement.

On CUDA with Triton (`kernels.py`), the first projection's bias and GELU run as one fused pass,
and a single token (a batch-1 decode step) skips sorting altogether: each of its k experts is
applied by a matrix-vector kernel that reads the expert index on the device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels
from .recompute import recomputed_in_backward


def capacity_weights(expert_index: torch.Tensor, probs: torch.Tensor, renormalize: bool, factor: float,
                     min_capacity: int) -> torch.Tensor:
    """[N, k] gate weights with DeepSpeed's capacity applied (top1gating / top2gating, drop_tokens).

    capacity = max(ceil(N / E * factor * k), min_capacity), computed in fp32 as DeepSpeed does. Each
    expert keeps the slots whose place in its queue is below capacity: every token's first choice, in
    position order, then every second choice (DeepSpeed's locations2 start after all first choices).
    A dropped slot weighs 0. With `renormalize` (top-2) the kept weights are divided by their sum,
    clamped at eps as DeepSpeed does: a token whose first choice is dropped gets its second one with
    weight 1, a token with both dropped gets 0. DeepSpeed's top-1 picks which tokens to keep at
    random (random token selection); position order is the deterministic rule used here.
    """
    n, k = expert_index.shape
    num_experts = probs.shape[-1]
    capacity = int(torch.ceil(torch.tensor(factor * k, dtype=torch.float32) * (n / num_experts)))
    capacity = max(capacity, int(min_capacity))
    one_hot = F.one_hot(expert_index, num_experts)  # [N, k, E]
    queue = one_hot.transpose(0, 1).reshape(k * n, num_experts).cumsum(0) - 1
    place = queue.reshape(k, n, num_experts).transpose(0, 1)
    keep = ((place < capacity) & one_hot.bool()).any(-1)
    weight = probs.gather(-1, expert_index) * keep
    if renormalize:
        weight = weight / weight.sum(-1, keepdim=True).clamp(min=torch.finfo(weight.dtype).eps)
    return weight


@torch.compiler.disable  # host-synced by nature: eager inside a compiled step, not recompiled per expert
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
    if x.device.type in ("cpu", "meta"):
        # The CPU kernel takes fp32, but the compiler's shape check insists on bf16.
        return x.dtype == torch.float32 and not torch.compiler.is_compiling()
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if _cuda_major(x.device.index if x.device.index is not None else torch.cuda.current_device()) < 9:
        return False  # the fused kernels are Hopper and newer
    # Hopper/Blackwell kernels need 16-byte aligned rows.
    return all(s % 8 == 0 for s in (experts.w_in.shape[1], experts.w_in.shape[2], experts.w_out.shape[2]))


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    """The GPU's compute capability (a constant to torch.compile, which would break its graph here)."""
    return torch.cuda.get_device_capability(index)[0]


def auto_mode(x: torch.Tensor, experts=None) -> str:
    if experts is not None and grouped_supported(x, experts):
        return "grouped"
    return "loop"


def sort_by_expert(expert_index: torch.Tensor, num_experts: int):
    """(order, sorted_expert, group_ends) for the flattened [N*k] slots, all on the device.

    order[j] is the flat slot at sorted position j; group_ends[e] is one past expert e's last row.
    """
    flat = expert_index.reshape(-1)
    order = flat.argsort(stable=True)
    sorted_expert = flat.index_select(0, order)
    experts = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    group_ends = torch.searchsorted(sorted_expert, experts, right=True, out_int32=True)
    return order, sorted_expert, group_ends


def add_group_bias(h: torch.Tensor, bias: torch.Tensor | None, sorted_expert: torch.Tensor) -> torch.Tensor:
    """h + bias[sorted_expert] as one small matmul: one pass over h, and the bias gradient is a
    [E, N] x [N, f] matmul instead of an atomic scatter into 4 rows."""
    if bias is None:
        return h
    one_hot = F.one_hot(sorted_expert, bias.shape[0]).to(h.dtype)
    return torch.addmm(h, one_hot, bias.to(h.dtype))


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, index) where every row of x is taken k times in all and `inverse` maps each
    taker back (index = order // k over the sorted (token, choice) slots, or a permutation with
    k = 1). Backward is a gather by `inverse` plus a sum over the k copies: index_select's own
    backward is an atomic index_add, several times slower in bf16 and not deterministic."""

    @staticmethod
    def forward(ctx, x, index, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse)
        if ctx.k > 1:
            grad_x = grad_x.view(-1, ctx.k, grad_x.shape[-1]).sum(1)
        return grad_x, None, None, None


def _bias_then_act(h: torch.Tensor, sorted_expert: torch.Tensor, experts):
    """(pre, act): the first projection's output h, biased and activated, is act(pre); pre is the
    tensor the activation's backward keeps (h itself for the fused kernel)."""
    name = experts.fused_bias_act()
    if name is not None and experts.b_in is not None and kernels.triton_ready(h):
        return h, lambda pre: kernels.bias_act(pre, experts.b_in, sorted_expert, name)
    return add_group_bias(h, experts.b_in, sorted_expert), experts.hidden_act


def _add_out_bias(out: torch.Tensor, sorted_expert: torch.Tensor, experts) -> torch.Tensor:
    if experts.b_out is not None and kernels.triton_ready(out):
        return kernels.bias_act(out, experts.b_out, sorted_expert, "none")
    return add_group_bias(out, experts.b_out, sorted_expert)


def one_token_ffn(x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor, experts) -> torch.Tensor:
    """sum_k w_k E_{i_k}(x) for one token (x [1, d]): each chosen expert by a matrix-vector kernel,
    no sorting (a decode step at batch 1; inference only)."""
    slots = expert_index.reshape(-1)
    xs = x.expand(slots.shape[0], -1)
    h = kernels.expert_matvec(xs, experts.w_in, slots)
    if experts.b_in is not None:
        h = h + experts.b_in.to(h.dtype).index_select(0, slots)
    out = kernels.expert_matvec(experts.hidden_act(h), experts.w_out, slots)
    if experts.b_out is not None:
        out = out + experts.b_out.to(out.dtype).index_select(0, slots)
    return (out * expert_weight.reshape(-1, 1).to(out.dtype)).sum(0, keepdim=True)


def grouped_ffn(x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor, experts) -> torch.Tensor:
    n, k = expert_index.shape
    if n == 1 and not torch.is_grad_enabled() and kernels.triton_ready(x):
        return one_token_ffn(x, expert_index, expert_weight, experts)
    order, sorted_expert, group_ends = sort_by_expert(expert_index, experts.num_experts)
    # inverse[s]: where slot s sits in the sorted order; it brings results back to (token, choice)
    # order by a gather (no atomics, deterministic), and is the backward of both gathers.
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=order.device))
    xs = _GatherRows.apply(x, order // k, inverse, k)
    pre, act = _bias_then_act(torch._grouped_mm(xs, experts.w_in, offs=group_ends), sorted_expert, experts)
    g = act(pre)
    with recomputed_in_backward(g, lambda: act(pre), enabled=experts.recompute_activations):
        out = torch._grouped_mm(g, experts.w_out, offs=group_ends)
    out = _add_out_bias(out, sorted_expert, experts)
    out = _GatherRows.apply(out, inverse, order, 1).view(n, k, -1)
    weight = expert_weight.to(out.dtype).unsqueeze(-1)
    if k == 1:
        return (out * weight).squeeze(1)
    return (out * weight).sum(dim=1)
