"""The fast MoE paths compute the same function as the plain per-expert loop (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from medmoe.config import MoEConfig
from medmoe.moe import MedMoEBlock, MoEState, Router, StackedExperts, dispatch
from medmoe.moe.experts import ffn_forward
from medmoe.bench.official_dispatch import einsum_dispatch
from medmoe.moe.router import route

D, F_SIZE, E = 16, 24, 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def make_experts(kind: str, bias: bool) -> StackedExperts:
    act = ACT2FN["silu" if kind == "gated" else "gelu_new"]
    experts = StackedExperts(kind, E, D, F_SIZE, bias, bias, act)
    if bias:
        with torch.no_grad():
            experts.b_in.normal_()
            experts.b_out.normal_()
    return experts


def run_both(experts, x, index, weight):
    """(grouped, loop) outputs and gradients wrt x, the gate weights and every parameter."""
    results = []
    for mode in ("grouped", "loop"):
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        experts.zero_grad()
        experts.dispatch_mode = mode
        y = experts(xg, index, wg)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        grads = [xg.grad, wg.grad] + [p.grad.clone() for p in experts.parameters()]
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("kind", ["gated", "mlp"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_equals_loop(kind, bias, top_k):
    experts = make_experts(kind, bias)
    for batch in range(1, 6):
        seq = int(torch.randint(1, 12, ()))
        x = torch.randn(batch * seq, D)
        probs = torch.randn(batch * seq, E).softmax(-1)
        weight, index = probs.topk(top_k, dim=-1)
        (y_fast, g_fast), (y_ref, g_ref) = run_both(experts, x, index, weight)
        assert rel_err(y_fast, y_ref) < 1e-5
        for a, b in zip(g_fast, g_ref):
            assert rel_err(a, b) < 1e-5


def test_grouped_when_some_experts_get_no_tokens():
    experts = make_experts("mlp", True)
    x = torch.randn(5, D)
    index = torch.full((5, 1), 2)
    (y_fast, g_fast), (y_ref, g_ref) = run_both(experts, x, index, torch.rand(5, 1))
    assert rel_err(y_fast, y_ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(g_fast, g_ref) if b.norm() > 0)
    assert experts.w_in.grad[[0, 1, 3]].abs().max() == 0


def test_grouped_has_no_data_dependent_shapes():
    """On the meta device nothing can be read back: a host sync (.item(), nonzero, mask indexing) fails."""
    experts = make_experts("mlp", True).to("meta", torch.bfloat16)
    x = torch.empty(7, D, device="meta", dtype=torch.bfloat16)
    index = torch.empty(7, 2, dtype=torch.long, device="meta")
    weight = torch.empty(7, 2, device="meta")
    assert dispatch.grouped_ffn(x, index, weight, experts).shape == (7, D)


def test_official_einsum_dispatch_equals_loop():
    experts = make_experts("mlp", True)
    x = torch.randn(37, D)
    logits = torch.randn(37, E)
    decision = route(logits, 1, False)
    ref = dispatch.loop(x, decision.expert_index, decision.expert_weight, E, experts.expert_forward)
    assert rel_err(einsum_dispatch(x, logits, E, experts.expert_forward), ref) < 1e-5


def test_fused_meta_ffn_equals_module():
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    mlp = PhiMLP(PhiConfig(hidden_size=D, intermediate_size=F_SIZE, hidden_act="gelu_new"))
    x = torch.randn(9, D)
    assert rel_err(ffn_forward(mlp, x), mlp(x)) < 1e-5


def test_fused_meta_ffn_keeps_adapters_on_its_linears():
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    class Shifted(nn.Linear):  # stands for an adapter that is still an nn.Linear (e.g. LoRA)
        def forward(self, x):
            return super().forward(x) + 1.0

    mlp = PhiMLP(PhiConfig(hidden_size=D, intermediate_size=F_SIZE, hidden_act="gelu_new"))
    shifted = Shifted(F_SIZE, D)
    shifted.load_state_dict(mlp.fc2.state_dict())
    mlp.fc2 = shifted
    x = torch.randn(4, D)
    assert rel_err(ffn_forward(mlp, x), mlp(x)) < 1e-5


@pytest.mark.parametrize("top_k", [1, 2])
def test_block_grouped_equals_loop(top_k):
    cfg = MoEConfig(enabled=True, top_k=top_k)
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    mlp = PhiMLP(PhiConfig(hidden_size=D, intermediate_size=F_SIZE, hidden_act="gelu_new"))
    router = Router(D, E)
    outs = []
    for mode in ("grouped", "loop"):
        experts = StackedExperts.from_ffn(mlp, E, mode)
        with torch.no_grad():
            experts.w_in.add_(torch.randn_like(experts.w_in, generator=torch.Generator().manual_seed(3)) * 0.1)
        block = MedMoEBlock(0, experts, mlp, cfg, MoEState(), shared_router=router)
        outs.append(block(torch.randn(3, 5, D, generator=torch.Generator().manual_seed(4))))
    assert outs[0].shape == (3, 5, D)
    assert rel_err(outs[0], outs[1]) < 1e-5


def test_auto_mode_falls_back_to_loop_off_hopper():
    experts = make_experts("mlp", False)
    assert dispatch.auto_mode(torch.randn(2, D), experts) == "grouped"
    assert dispatch.auto_mode(torch.randn(2, D, dtype=torch.float64), experts) == "loop"
