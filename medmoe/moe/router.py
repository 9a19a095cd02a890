"""Where experts are chosen: the modality router and the top-k rule.

The router is Linear(d, num_experts) with bias, evaluated in fp32 whatever the model dtype.
In the paper it is trained as a modality classifier (CT, MRI, X-Ray, Pathology) and then
scores every token in every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


SMALL_ROWS = 64  # up to this many tokens, the router's product runs as a product and a sum


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [..., num_experts] in fp32."""
        if x.is_cuda and x.numel() <= SMALL_ROWS * self.weight.shape[1] and not torch.is_grad_enabled():
            # A decode step's few rows: a product and a sum (which torch.compile fuses with the
            # softmax and top-1). cuBLAS runs an fp32 product this thin as a split-K kernel of
            # about 60 us a layer on an H100 at batch 32.
            return (x.float().unsqueeze(-2) * self.weight.float()).sum(-1) + self.bias.float()
        return F.linear(x.float(), self.weight.float(), self.bias.float())


def router_feature(hidden_states, mask: torch.Tensor) -> torch.Tensor:
    """[B, d]: the modality router's input (SPEC section 1), the mean over all layers' hidden
    states (embedding output included) and over the positions where `mask` [B, S] is set."""
    weights = mask.float().unsqueeze(-1)
    summed = torch.stack(tuple(hidden_states)).float().mean(dim=0).mul(weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1)


@dataclass
class RoutingDecision:
    probs: torch.Tensor  # [N, E] fp32 softmax over domain experts
    expert_index: torch.Tensor  # [N, k] chosen experts, best first
    expert_weight: torch.Tensor  # [N, k] fp32 gate values (renormalised or not)


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> RoutingDecision:
    """Deterministic top-k: no noise at inference or training (the official top-2 path adds noise)."""
    probs = logits.softmax(dim=-1)
    if top_k == 1:  # a max is a plain reduction (fused by torch.compile); topk launches a sort kernel
        weight, index = probs.max(dim=-1, keepdim=True)
    else:
        weight, index = probs.topk(top_k, dim=-1)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return RoutingDecision(probs=probs, expert_index=index, expert_weight=weight)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style: num_experts * sum_e (fraction of tokens whose first choice is e) * (mean prob of e)."""
    fraction = F.one_hot(expert_index[:, 0], num_experts).float().mean(dim=0)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()
