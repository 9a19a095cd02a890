"""What an expert is.

- `StackedExperts`: E copies of a known FFN type with their weights stacked as [E, ...] tensors,
  so all experts run as one grouped matmul. Two known types cover the common LLMs:
  "gated"  y = (act(x Wg) * (x Wu)) Wd        (Llama, Qwen2, StableLM, Mistral: SwiGLU)
  "mlp"    y = act(x W1 + b1) W2 + b2          (Phi: GELU fc1/fc2 with bias)
  For "gated", w_in holds [Wg | Wu] side by side: [E, d, 2f].
- `ModuleExperts`: E deep copies of any FFN module (the generic path).
- `LoRAExperts`: expert e = the shared FFN with low-rank deltas B_e A_e on each projection
  (Med-LoRAMoE); the shared FFN is the layer's meta expert and is not copied.

Every class maps (x [N, d], expert_index [N, k], expert_weight [N, k]) -> sum_k w_k E_{i_k}(x).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import linear_weight
from . import dispatch
from .recompute import recomputed_in_backward


def ffn_kind(mlp: nn.Module) -> str | None:
    """'gated', 'mlp', or None when the FFN type is not one we can stack."""
    names = dict(mlp.named_children())
    linear = lambda n: isinstance(names.get(n), nn.Linear)  # noqa: E731
    if linear("gate_proj") and linear("up_proj") and linear("down_proj") and hasattr(mlp, "act_fn"):
        return "gated"
    if linear("fc1") and linear("fc2") and hasattr(mlp, "activation_fn"):
        return "mlp"
    return None


def ffn_activation(mlp: nn.Module):
    return mlp.act_fn if ffn_kind(mlp) == "gated" else mlp.activation_fn


# Activations that transformers writes as several elementwise ops, and one fused kernel computing
# the same function (GELU's tanh form). Only the speed differs; rounding is finer, if anything.
_FUSED_ACTIVATIONS = {"NewGELUActivation": lambda h: F.gelu(h, approximate="tanh")}


def is_gelu_tanh(act) -> bool:
    """GELU's tanh form, in any of its spellings (transformers' gelu_new, gelu_pytorch_tanh, torch's)."""
    if isinstance(act, nn.GELU):
        return act.approximate == "tanh"
    return type(act).__name__ in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh")


def use_fused_activations(model: nn.Module) -> int:
    """Swap every multi-kernel activation module in `model` (transformers' gelu_new) for its one-kernel
    equivalent, in place; returns how many. The dense layers' FFNs then run as fast as the experts'."""
    swapped = 0
    for module in model.modules():
        for name in ("activation_fn", "act_fn", "act"):
            act = getattr(module, name, None)
            if isinstance(act, nn.Module) and type(act).__name__ == "NewGELUActivation":
                setattr(module, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def fast_activation(act):
    """`act`, or a single-kernel equivalent when transformers' version is a chain of small ops."""
    return _FUSED_ACTIVATIONS.get(type(act).__name__, act)


_PLAIN_FFN_CHILDREN = {"mlp": {"fc1", "fc2", "activation_fn"}, "gated": {"gate_proj", "up_proj", "down_proj", "act_fn"}}


def plain_ffn(mlp: nn.Module) -> str | None:
    """ffn_kind(mlp) when the FFN is nothing but its projections and activation (so ffn_forward
    can run it from its parts), else None."""
    kind = ffn_kind(mlp)
    return kind if kind is not None and set(dict(mlp.named_children())) <= _PLAIN_FFN_CHILDREN[kind] else None


def ffn_forward(mlp: nn.Module, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """mlp(x), with the fused activation when the FFN is exactly fc1 -> act -> fc2 (Phi's MLP): the
    meta expert's fast path (Phi's GELU is 8 kernels in transformers, 1 here). The projections are
    called as modules, so adapters on them (LoRA) still apply. `recompute` (a plain_ffn only):
    backward recomputes the activation's output (act(fc1(x)), or act(gate) * up) instead of
    keeping it (recompute.py)."""
    kind = plain_ffn(mlp)
    if kind == "mlp" and (recompute or type(mlp.activation_fn).__name__ in _FUSED_ACTIVATIONS):
        act = fast_activation(mlp.activation_fn)
        h = mlp.fc1(x)
        g = act(h)
        with recomputed_in_backward(g, lambda: act(h), enabled=recompute):
            return mlp.fc2(g)
    if kind == "gated" and recompute:
        act = fast_activation(mlp.act_fn)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        g = act(gate) * up
        with recomputed_in_backward(g, lambda: act(gate) * up):
            return mlp.down_proj(g)
    return mlp(x)


def ffn_weights(mlp: nn.Module) -> dict[str, torch.Tensor | None]:
    """A known FFN's weights in the stacked layout (input-major: x @ w)."""
    kind = ffn_kind(mlp)
    if kind == "gated":
        w_in = torch.cat([linear_weight(mlp.gate_proj).T, linear_weight(mlp.up_proj).T], dim=1)
        b_in = None
        if mlp.gate_proj.bias is not None:
            b_in = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
        return {"w_in": w_in, "b_in": b_in, "w_out": linear_weight(mlp.down_proj).T, "b_out": mlp.down_proj.bias}
    if kind == "mlp":
        return {"w_in": linear_weight(mlp.fc1).T, "b_in": mlp.fc1.bias, "w_out": linear_weight(mlp.fc2).T, "b_out": mlp.fc2.bias}
    raise TypeError(f"{type(mlp).__name__} is not a known FFN type; use the generic ModuleExperts")


class StackedExperts(nn.Module):
    def __init__(self, kind: str, num_experts: int, hidden_size: int, ffn_size: int, bias_in: bool, bias_out: bool, act, dispatch_mode: str = "auto"):
        super().__init__()
        self.kind, self.num_experts, self.act, self.dispatch_mode = kind, num_experts, act, dispatch_mode
        self.recompute_activations = False  # backward recomputes hidden_act's output (recompute.py)
        f_in = 2 * ffn_size if kind == "gated" else ffn_size
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, f_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        self.b_in = nn.Parameter(torch.zeros(num_experts, f_in)) if bias_in else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias_out else None
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    @classmethod
    def from_ffn(cls, mlp: nn.Module, num_experts: int, dispatch_mode: str = "auto") -> "StackedExperts":
        """Upcycling: every expert starts as an exact copy of `mlp`."""
        w = ffn_weights(mlp)
        hidden, f_in = w["w_in"].shape
        ffn = f_in // 2 if ffn_kind(mlp) == "gated" else f_in
        experts = cls(ffn_kind(mlp), num_experts, hidden, ffn, w["b_in"] is not None, w["b_out"] is not None, ffn_activation(mlp), dispatch_mode)
        experts.to(device=w["w_in"].device, dtype=w["w_in"].dtype)
        with torch.no_grad():
            for name, value in w.items():
                if value is not None:
                    getattr(experts, name).copy_(value.detach().unsqueeze(0).expand_as(getattr(experts, name)))
        return experts

    def hidden_act(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN's nonlinearity applied to the first projection's output."""
        act = fast_activation(self.act)
        if self.kind == "gated":
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)

    def fused_bias_act(self) -> str | None:
        """The activation `kernels.bias_act` can fuse with the first bias ("gelu_tanh"), or None."""
        return "gelu_tanh" if self.kind == "mlp" and is_gelu_tanh(self.act) else None

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: the plain reference every fast path is tested against."""
        h = x @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        g = self.hidden_act(h)
        with recomputed_in_backward(g, lambda: self.hidden_act(h), enabled=self.recompute_activations):
            y = g @ self.w_out[e]
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        mode = self.dispatch_mode
        if mode == "auto":
            mode = dispatch.auto_mode(x, self)
        if mode == "grouped":
            return dispatch.grouped_ffn(x, expert_index, expert_weight, self)
        return dispatch.loop(x, expert_index, expert_weight, self.num_experts, self.expert_forward)


class ModuleExperts(nn.Module):
    """The generic path: E deep copies of an arbitrary FFN module."""

    def __init__(self, mlp: nn.Module, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(num_experts))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        return dispatch.loop(x, expert_index, expert_weight, self.num_experts, self.expert_forward)


class LoRAExperts(nn.Module):
    """Med-LoRAMoE: expert e = shared FFN with W + (alpha / r) B_e A_e on its input and output projections.

    B starts at zero, so right after upcycling every expert equals the shared FFN, as with full copies.
    The shared FFN (the meta expert) is referenced, not copied or registered here.
    """

    def __init__(self, mlp: nn.Module, num_experts: int, rank: int, alpha: float):
        super().__init__()
        kind = ffn_kind(mlp)
        if kind is None:
            raise TypeError(f"LoRA experts need a known FFN type (gated or fc1/fc2), not {type(mlp).__name__}")
        w = ffn_weights(mlp)
        hidden, f_in = w["w_in"].shape
        ffn = w["w_out"].shape[0]
        self.kind, self.num_experts, self.scale = kind, num_experts, alpha / rank
        self.fuse_with_shared = True  # False: the block takes the per-expert loop (reference, benchmarks)
        object.__setattr__(self, "shared", mlp)  # a reference: the meta expert owns these weights
        dev, dt = w["w_in"].device, w["w_in"].dtype
        self.a_in = nn.Parameter(torch.empty(num_experts, hidden, rank, device=dev, dtype=dt))
        self.b_in = nn.Parameter(torch.zeros(num_experts, rank, f_in, device=dev, dtype=dt))
        self.a_out = nn.Parameter(torch.empty(num_experts, ffn, rank, device=dev, dtype=dt))
        self.b_out = nn.Parameter(torch.zeros(num_experts, rank, hidden, device=dev, dtype=dt))
        for a in (self.a_in, self.a_out):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def _shared_parts(self):
        """(activation, input projections, output projection) of the shared FFN, called as modules
        so that adapters on them (phase-2 LoRA) apply."""
        s = self.shared
        if self.kind == "gated":
            return fast_activation(s.act_fn), (s.gate_proj, s.up_proj), s.down_proj
        return fast_activation(s.activation_fn), (s.fc1,), s.fc2

    def _hidden(self, act, pre: list[torch.Tensor], delta_in: torch.Tensor | int = 0) -> torch.Tensor:
        """The FFN's hidden state from its input projections' outputs, plus an expert's input delta."""
        if self.kind == "gated":
            if isinstance(delta_in, torch.Tensor):
                delta_gate, delta_up = delta_in.chunk(2, dim=-1)
                return act(pre[0] + delta_gate) * (pre[1] + delta_up)
            return act(pre[0]) * pre[1]
        return act(pre[0] + delta_in)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """The shared FFN's own layers (LoRA-adapted ones included) plus expert e's low-rank deltas;
        no expert weight matrix is ever materialised. The plain reference of `forward_with_shared`."""
        act, projections, out = self._shared_parts()
        delta_in = (x @ self.a_in[e]) @ self.b_in[e] * self.scale
        h = self._hidden(act, [p(x) for p in projections], delta_in)
        return out(h) + (h @ self.a_out[e]) @ self.b_out[e] * self.scale

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        return dispatch.loop(x, expert_index, expert_weight, self.num_experts, self.expert_forward)

    def forward_with_shared(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        """sum_k w_k E_{i_k}(x) + shared(x): the experts and the meta expert in one pass of the shared FFN.

        Every expert shares the meta expert's projections, so they run once for all tokens: the
        input projections' outputs feed the meta expert and every expert (which adds its low-rank
        delta before the activation), and the output projection is linear, so it runs once on
        the gate-weighted sum of the hidden states. The loop path instead runs the shared FFN again
        on each expert's tokens (twice the FFN work) and syncs with the host per expert.
        Low-rank factors of all E experts are applied to every token and masked to its chosen
        expert: E*r extra columns (a few percent of the FFN's work), and every shape is fixed by the
        token count, so there is no host sync (CUDA graphs can capture it).
        """
        n, k = expert_index.shape
        num, rank = self.num_experts, self.a_in.shape[-1]
        act, projections, out = self._shared_parts()
        pre = [p(x) for p in projections]
        hidden = self._hidden(act, pre)  # the meta expert's
        low_in = x @ self.a_in.permute(1, 0, 2).reshape(x.shape[-1], num * rank)  # [n, E*r]
        b_in = self.b_in.reshape(num * rank, -1)
        a_out = self.a_out.permute(1, 0, 2).reshape(self.a_out.shape[1], num * rank)
        low_out, gate_sum = 0, 0
        for j in range(k):
            chosen = F.one_hot(expert_index[:, j], num).to(low_in.dtype)[:, :, None]  # [n, E, 1]
            mask = lambda t: (t.view(n, num, rank) * chosen).view(n, num * rank)  # noqa: E731
            h = self._hidden(act, pre, mask(low_in) @ b_in * self.scale)
            weight = expert_weight[:, j:j + 1].to(h.dtype)
            hidden = hidden + weight * h
            low_out = low_out + mask(h @ a_out) * weight
            gate_sum = gate_sum + weight
        y = out(hidden) + (low_out @ self.b_out.reshape(num * rank, -1)) * self.scale
        if out.bias is not None:  # out(hidden) added the bias once; the experts' outputs carry it too
            y = y + gate_sum * out.bias
        return y
