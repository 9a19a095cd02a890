"""The official Med-MoE dispatch, re-implemented for benchmarks and tests only.

The official code (MoE-LLaVA on DeepSpeed-MoE) routes with GShard's top-1 gating and moves tokens
with one-hot einsums: a dispatch mask [S, E, C] gathers tokens into per-expert buffers of
capacity C, each expert runs on its whole buffer, padding included, and a combine tensor of the
same shape scatters the results back. With `drop_tokens=False` the capacity is the largest
expert's token count, read on the host (a sync every layer). This mirrors DeepSpeed's
`top1gating` (no noise, no random token selection, since nothing is dropped) and `MOELayer`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def top1_gating(logits: torch.Tensor):
    """(aux_loss, combine_weights [S, E, C], dispatch_mask [S, E, C]) as in DeepSpeed's top1gating."""
    gates = F.softmax(logits.float(), dim=1)
    num_experts = gates.shape[1]
    indices1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=num_experts)
    exp_counts = torch.sum(mask1, dim=0).detach().to("cpu")  # the host sync
    capacity = int(exp_counts.max())  # drop_tokens=False: capacity = the busiest expert's count
    me = gates.mean(dim=0)
    ce = mask1.float().mean(dim=0)
    aux_loss = (me * ce).sum() * num_experts
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    gates1_s = (gates * mask1).sum(dim=1)  # the top-1 probability, not renormalised
    locations1_sc = F.one_hot(locations1_s, num_classes=capacity).float()
    combine_weights = torch.einsum("se,sc->sec", gates1_s.unsqueeze(1) * mask1, locations1_sc)
    dispatch_mask = combine_weights.bool()
    return aux_loss, combine_weights, dispatch_mask


def einsum_dispatch(x: torch.Tensor, logits: torch.Tensor, num_experts: int,
                    expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """DeepSpeed MOELayer: y = combine(expert_e(dispatch(x))). x [S, M], logits [S, E] -> [S, M]."""
    _, combine_weights, dispatch_mask = top1_gating(logits)
    dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.type_as(x), x)
    expert_output = torch.stack([expert_fn(e, dispatched[e]) for e in range(num_experts)])
    return torch.einsum("sec,ecm->sm", combine_weights.type_as(x), expert_output)
