"""The Med-MoE block that replaces a layer's FFN:

    p = softmax(router(x));  y = sum_k p_k E_{i_k}(x)  [+ E_meta(x)]

With top_k=1, the meta expert on and no renormalisation this is the paper's
y = p_top1 * E_top1(x) + E_meta(x). The block returns a plain tensor, as the FFN it replaces
did; routing records and auxiliary losses go to a `MoEState` shared by all blocks of a model.

A block without a meta expert (`meta=None`) runs its routed experts alone, and adds nothing in
the meta-only pre-pass of routing="pooled".

The block is the plain reference. An inference engine may compute its two parts elsewhere (the
meta expert inside a fused layer's products, the routed experts beside the layer's attention:
engine/fused_layers.py, engine/overlap.py) where `is_meta_plus_routed` says that the forward is
nothing but `ffn_forward(meta, x) + routed_experts(x)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import MoEConfig
from .dispatch import capacity_weights
from .experts import ffn_forward
from .router import Router, load_balancing_loss, route, z_loss


@dataclass
class LayerRouting:
    layer: int
    expert_index: torch.Tensor  # [B, S, k]
    probs: torch.Tensor  # [B, S, E]


@dataclass
class MoEState:
    """Per-forward side channel between the model and its MoE blocks."""

    attention_mask: torch.Tensor | None = None  # [B, S]: the positions per-sample routing pools (the prompt's)
    record_routing: bool = False
    routing: list[LayerRouting] = field(default_factory=list)
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    sample_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, E], kept for decode
    meta_only: bool = False  # every block runs its meta expert alone (the pre-pass of routing="pooled")

    def start(self, attention_mask: torch.Tensor | None, record_routing: bool, new_sequence: bool) -> None:
        self.attention_mask = attention_mask
        self.record_routing = record_routing
        self.routing, self.aux_losses = [], []
        if new_sequence:
            self.sample_probs = {}


class MedMoEBlock(nn.Module):
    def __init__(self, layer_idx: int, experts: nn.Module, meta: nn.Module | None, cfg: MoEConfig,
                 state: MoEState, router: Router | None = None, shared_router: Router | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.cfg = cfg
        self.experts = experts
        self.meta = meta
        self.router = router  # per-layer router (registered here), or None
        self.recompute_activations = False  # the meta expert's activation output recomputed in backward
        # The shared router belongs to the model; a plain reference keeps one copy in the state dict.
        object.__setattr__(self, "_shared_router", shared_router)
        object.__setattr__(self, "_state", state)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router if self.router is not None else self._shared_router
        return router(x)

    def routed_experts(self, x: torch.Tensor) -> torch.Tensor:
        """sum_k w_k E_{i_k}(x) for tokens x [N, d] routed one by one: the forward without the meta
        expert and without records (see `is_meta_plus_routed`)."""
        decision = self._route_tokens(self.router_logits(x))
        return self.experts(x, decision.expert_index, decision.expert_weight)

    def _route_tokens(self, logits: torch.Tensor):
        decision = route(logits, self.cfg.top_k, self.cfg.renormalize)
        if self.cfg.capacity_factor_at_inference is not None and not self.training:  # opt-in, MoE-LLaVA's eval
            decision.expert_weight = capacity_weights(decision.expert_index, decision.probs, self.cfg.renormalize,
                                                      self.cfg.capacity_factor_at_inference,
                                                      self.cfg.min_capacity_at_inference)
        return decision

    def is_meta_plus_routed(self) -> bool:
        """Whether `forward(x)` is `ffn_forward(self.meta, x) + self.routed_experts(x)` (the second
        term alone without a meta expert) for tokens x [N, d] and does nothing else (token routing,
        a meta expert apart from the experts, no routing records, no auxiliary losses): the
        contract under which an engine may compute the two parts on its own schedule."""
        state = self._state
        return (not self.training and self.cfg.routing == "token" and not state.meta_only and not state.record_routing
                and (self.meta is None or getattr(self.experts, "shared", None) is not self.meta))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self._state.meta_only:
            return ffn_forward(self.meta, x).reshape(shape) if self.meta is not None else torch.zeros_like(hidden_states)
        if self.cfg.routing in ("sample", "pooled") and hidden_states.dim() == 3:
            logits, decision = self._route_per_sample(hidden_states)
        else:
            logits = self.router_logits(x)
            decision = self._route_tokens(logits)
        if (self.meta is not None and getattr(self.experts, "shared", None) is self.meta
                and self.experts.fuse_with_shared):
            # LoRA experts are deltas on the meta FFN: one pass of it serves both (experts.py).
            y = self.experts.forward_with_shared(x, decision.expert_index, decision.expert_weight)
        else:
            y = self.experts(x, decision.expert_index, decision.expert_weight)
            if self.meta is not None:
                y = y + ffn_forward(self.meta, x, recompute=self.recompute_activations)
        self._record(shape, logits, decision)
        return y.reshape(shape)

    def _route_per_sample(self, h: torch.Tensor):
        """Every token of a sample goes to the expert(s) picked from the sample's mean FFN input
        over its prompt (the state's mask: in training, the positions without labels, so that an
        answer never chooses its own expert). Made at prefill, kept for the tokens decoded after it.
        """
        b, s, _ = h.shape
        state = self._state
        if (s == 1 or self.cfg.routing == "pooled") and self.layer_idx in state.sample_probs:
            probs = state.sample_probs[self.layer_idx]  # decoding, or chosen by the model's pre-pass
        else:
            mask = state.attention_mask
            if mask is None or mask.shape[1] < s:
                weights = torch.ones(b, s, device=h.device)
            else:
                weights = mask[:, -s:].to(h.device).float()
            pooled = (h.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
            probs = self.router_logits(pooled).softmax(-1)
            state.sample_probs[self.layer_idx] = probs
        logits = probs.log()[:, None, :].expand(b, s, -1).reshape(b * s, -1)
        return logits, route(logits, self.cfg.top_k, self.cfg.renormalize)

    def _record(self, shape, logits: torch.Tensor, decision) -> None:
        state = self._state
        if self.training and (self.cfg.aux_loss_coef > 0 or self.cfg.z_loss_coef > 0):
            aux = logits.new_zeros(())
            if self.cfg.aux_loss_coef > 0:
                aux = aux + self.cfg.aux_loss_coef * load_balancing_loss(decision.probs, decision.expert_index, self.cfg.num_experts)
            if self.cfg.z_loss_coef > 0:
                aux = aux + self.cfg.z_loss_coef * z_loss(logits)
            state.aux_losses.append(aux)
        if state.record_routing:
            lead = tuple(shape[:-1]) if len(shape) == 3 else (1, shape[0])
            state.routing.append(LayerRouting(
                layer=self.layer_idx,
                expert_index=decision.expert_index.detach().reshape(*lead, -1),
                probs=decision.probs.detach().reshape(*lead, -1),
            ))
