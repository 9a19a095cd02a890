"""LoRA adapters on linear layers (used by compact recipes such as Nano's phase 2).

`LoRALinear` is an `nn.Linear` (same weight and bias objects) plus a low-rank delta:
    y = x W^T + b + (alpha / r) * (x A^T) B^T,   B = 0 at the start.
It stays an `nn.Linear`, so FFN-type detection and upcycling keep working; `effective_weight()`
is what upcycling copies into full experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "dense", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # skip nn.Linear's own weight allocation: we reuse the base's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def effective_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def linear_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight a linear layer actually applies (its LoRA delta included)."""
    return linear.effective_weight() if isinstance(linear, LoRALinear) else linear.weight


def add_lora(module: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns the wrapped names."""
    wrapped = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its layer's weight, W + (alpha / r) B A, for inference: one
    matmul per projection instead of three. Returns how many were merged. The merged weights are
    no longer the base's, so a merged model is neither trainable as LoRA nor exportable as a delta."""
    merged = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                with torch.no_grad():
                    weight = child.weight.float() + child.scale * (child.lora_B.float() @ child.lora_A.float())
                plain.weight = nn.Parameter(weight.to(child.weight.dtype), requires_grad=False)
                plain.bias = child.bias
                setattr(parent, child_name, plain)
                merged += 1
    return merged


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.endswith(("lora_A", "lora_B"))]
