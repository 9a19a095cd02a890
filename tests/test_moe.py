"""The Med-MoE block: upcycling identity, stacked experts vs a plain per-expert loop, routing rules."""

import copy

import pytest
import torch
from torch import nn

from medmoe.config import MoEConfig
from medmoe.moe import MedMoEBlock, MoEState, Router, StackedExperts, ModuleExperts, LoRAExperts, route
from medmoe.moe import dispatch
from medmoe.model.presets import TINY_LLMS
from transformers import AutoConfig, AutoModelForCausalLM


def tiny_ffn(kind: str) -> nn.Module:
    cfg = dict(TINY_LLMS["llama" if kind == "gated" else "phi"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return model.model.layers[0].mlp


def randomise(experts: nn.Module) -> None:
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.05)


def reference(x, index, weight, expert_fn):
    """Token by token: y_t = sum_k w_tk * E_{i_tk}(x_t)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            out[t] += weight[t, j] * expert_fn(int(index[t, j]), x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("kind", ["gated", "mlp"])
def test_upcycled_block_is_one_plus_p_times_ffn(kind):
    ffn = tiny_ffn(kind)
    cfg = MoEConfig(enabled=True)
    router = Router(64, 4)
    block = MedMoEBlock(0, StackedExperts.from_ffn(ffn, 4), ffn, cfg, MoEState(), shared_router=router)
    x = torch.randn(2, 7, 64)
    p_top1 = router(x).softmax(-1).max(-1).values
    expected = (1 + p_top1)[..., None] * ffn(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_a_block_without_meta_expert_runs_its_routed_experts_alone():
    ffn = tiny_ffn("mlp")
    state = MoEState()
    router = Router(64, 4)
    block = MedMoEBlock(0, StackedExperts.from_ffn(ffn, 4), None, MoEConfig(enabled=True), state, shared_router=router)
    block.eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        p_top1 = router(x).softmax(-1).max(-1).values
        torch.testing.assert_close(block(x), p_top1[..., None] * ffn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block.routed_experts(x.reshape(14, 64)).reshape(2, 7, 64), block(x))
        assert block.is_meta_plus_routed()
        state.meta_only = True  # routing="pooled"'s pre-pass through the meta experts: nothing here
        assert not block(x).any() and not block.is_meta_plus_routed()


def test_lora_experts_start_equal_to_the_shared_ffn():
    ffn = tiny_ffn("gated")
    router = Router(64, 4)
    block = MedMoEBlock(0, LoRAExperts(ffn, 4, rank=4, alpha=8), ffn, MoEConfig(enabled=True, expert_type="lora"),
                        MoEState(), shared_router=router)
    x = torch.randn(3, 5, 64)
    p_top1 = router(x).softmax(-1).max(-1).values
    torch.testing.assert_close(block(x), (1 + p_top1)[..., None] * ffn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gated", "mlp"])
@pytest.mark.parametrize("mode", ["loop", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_stacked_experts_equal_a_plain_loop(kind, mode, top_k):
    torch.manual_seed(1)
    ffn = tiny_ffn(kind)
    experts = StackedExperts.from_ffn(ffn, 4, dispatch_mode=mode)
    randomise(experts)
    plain = ModuleExperts(ffn, 4)  # the same experts as four ordinary FFN modules
    for e, module in enumerate(plain.experts):
        with torch.no_grad():
            if kind == "gated":
                gate, up = experts.w_in[e].T.chunk(2, dim=0)
                module.gate_proj.weight.copy_(gate)
                module.up_proj.weight.copy_(up)
                module.down_proj.weight.copy_(experts.w_out[e].T)
            else:
                module.fc1.weight.copy_(experts.w_in[e].T)
                module.fc1.bias.copy_(experts.b_in[e])
                module.fc2.weight.copy_(experts.w_out[e].T)
                module.fc2.bias.copy_(experts.b_out[e])
    router = Router(64, 4)
    for batch in range(1, 6):
        length = int(torch.randint(1, 9, ()))
        x = torch.randn(batch * length, 64)
        decision = route(router(x) * 20, top_k, renormalize=False)  # sharp routing: all experts used
        got = experts(x, decision.expert_index, decision.expert_weight)
        want = reference(x, decision.expert_index, decision.expert_weight, plain.expert_forward)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_dispatch_gradients_equal_loop():
    ffn = tiny_ffn("mlp")
    a = StackedExperts.from_ffn(ffn, 4, dispatch_mode="loop")
    randomise(a)
    b = copy.deepcopy(a)
    b.dispatch_mode = "grouped"
    x = torch.randn(30, 64, requires_grad=True)
    idx = torch.randint(0, 4, (30, 1))
    w = torch.rand(30, 1)
    a(x, idx, w).square().sum().backward()
    ga = [p.grad.clone() for p in a.parameters()] + [x.grad.clone()]
    x.grad = None
    b(x, idx, w).square().sum().backward()
    gb = [p.grad for p in b.parameters()] + [x.grad]
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)


def test_dropless_every_token_is_processed():
    ffn = tiny_ffn("gated")
    experts = StackedExperts.from_ffn(ffn, 4)
    x = torch.randn(50, 64)
    everyone_to_expert_2 = torch.full((50, 1), 2)
    y = experts(x, everyone_to_expert_2, torch.ones(50, 1))
    torch.testing.assert_close(y, ffn(x), rtol=1e-5, atol=1e-5)


def test_routing_is_deterministic_and_renormalisation_optional():
    logits = torch.randn(10, 4)
    a, b = route(logits, 2, False), route(logits, 2, False)
    assert torch.equal(a.expert_index, b.expert_index)
    assert (a.expert_weight.sum(-1) < 1).all()
    torch.testing.assert_close(route(logits, 2, True).expert_weight.sum(-1), torch.ones(10))


def test_top1_routing_picks_the_most_probable_expert_with_its_gate():
    logits = torch.randn(50, 4)
    decision = route(logits, 1, False)
    weight, index = logits.softmax(-1).topk(1, dim=-1)
    assert decision.expert_index.shape == (50, 1) and torch.equal(decision.expert_index, index)
    torch.testing.assert_close(decision.expert_weight, weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode router path runs on a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 32, 64])
def test_decode_router_equals_its_linear_form(rows):
    router = Router(64, 4).cuda()
    x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(router(x), nn.functional.linear(x.float(), router.weight, router.bias))


def test_per_sample_routing_sends_every_token_of_a_sample_to_one_expert():
    ffn = tiny_ffn("gated")
    state = MoEState()
    cfg = MoEConfig(enabled=True, routing="sample")
    block = MedMoEBlock(0, StackedExperts.from_ffn(ffn, 4), ffn, cfg, state, shared_router=Router(64, 4))
    state.start(torch.ones(3, 6), record_routing=True, new_sequence=True)
    block(torch.randn(3, 6, 64))
    chosen = state.routing[0].expert_index[..., 0]
    assert all(len(set(row.tolist())) == 1 for row in chosen)
    # decoding one more token keeps each sample's expert
    state.start(torch.ones(3, 7), record_routing=True, new_sequence=False)
    block(torch.randn(3, 1, 64))
    assert torch.equal(state.routing[0].expert_index[:, 0, 0], chosen[:, 0])


def test_aux_losses_are_recorded_when_enabled():
    ffn = tiny_ffn("gated")
    state = MoEState()
    cfg = MoEConfig(enabled=True, aux_loss_coef=0.01, z_loss_coef=0.001)
    block = MedMoEBlock(0, StackedExperts.from_ffn(ffn, 4), ffn, cfg, state, shared_router=Router(64, 4)).train()
    state.start(None, False, True)
    block(torch.randn(2, 5, 64))
    assert len(state.aux_losses) == 1 and state.aux_losses[0] > 0


def test_auto_dispatch_picks_grouped_for_cpu_fp32():
    experts = StackedExperts.from_ffn(tiny_ffn("gated"), 4)
    assert dispatch.auto_mode(torch.randn(2, 64), experts) == ("grouped" if hasattr(torch, "_grouped_mm") else "loop")


@pytest.mark.parametrize("kind", ["gated", "mlp"])
def test_lora_expert_equals_an_ffn_with_merged_weights(kind):
    """Expert e = the shared FFN with W + (alpha/r) A_e B_e, computed here by merging explicitly."""
    from medmoe.adapters import add_lora

    ffn = tiny_ffn(kind)
    add_lora(ffn, rank=4, alpha=8)  # the shared FFN itself LoRA-adapted, as after a compact phase 2
    experts = LoRAExperts(ffn, 4, rank=4, alpha=8)
    for module in (ffn, experts):
        randomise(module)
    x = torch.randn(9, 64)
    for e in range(4):
        merged = copy.deepcopy(ffn)
        w_in_delta = experts.scale * (experts.a_in[e] @ experts.b_in[e])  # [d, f_in], input-major
        w_out_delta = experts.scale * (experts.a_out[e] @ experts.b_out[e])  # [f, d]
        with torch.no_grad():
            names_in = ("gate_proj", "up_proj") if kind == "gated" else ("fc1",)
            for name, part in zip(names_in, w_in_delta.chunk(len(names_in), dim=1)):
                linear = getattr(merged, name)
                linear.weight.copy_(linear.effective_weight() + part.T)
                linear.lora_B.zero_()
            out_linear = merged.down_proj if kind == "gated" else merged.fc2
            out_linear.weight.copy_(out_linear.effective_weight() + w_out_delta.T)
            out_linear.lora_B.zero_()
        torch.testing.assert_close(experts.expert_forward(e, x), merged(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gated", "mlp"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_lora_experts_with_meta_equal_the_loop(kind, top_k):
    """The block's one-pass path (shared FFN once, masked low-rank factors) against the plain loop
    over experts plus the meta FFN: outputs and every gradient."""
    from medmoe.adapters import add_lora

    torch.manual_seed(3)
    ffn = tiny_ffn(kind)
    add_lora(ffn, rank=4, alpha=8)  # the shared FFN LoRA-adapted, as after Nano's phase 2
    experts = LoRAExperts(ffn, 4, rank=4, alpha=8)
    for module in (ffn, experts):
        randomise(module)
    x = torch.randn(2, 11, 64, requires_grad=True)
    decision = route(torch.randn(22, 4), top_k, renormalize=False)
    if top_k == 1:  # one expert gets no token: the masks must cope
        decision.expert_index[decision.expert_index == 3] = 0

    def run(fused: bool):
        flat = x.reshape(-1, 64)
        if fused:
            y = experts.forward_with_shared(flat, decision.expert_index, decision.expert_weight)
        else:
            y = experts(flat, decision.expert_index, decision.expert_weight) + ffn(flat)
        params = [x] + [p for p in list(ffn.parameters()) + list(experts.parameters()) if p.requires_grad]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), params)
        return y, grads

    y_fused, g_fused = run(True)
    y_loop, g_loop = run(False)
    torch.testing.assert_close(y_fused, y_loop, rtol=1e-5, atol=1e-5)
    assert y_loop.abs().max() > 1e-2  # the experts' deltas are not zero: the test can fail
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_block_takes_the_fused_path_for_lora_experts():
    ffn = tiny_ffn("gated")
    experts = LoRAExperts(ffn, 4, rank=4, alpha=8)
    randomise(experts)
    block = MedMoEBlock(0, experts, ffn, MoEConfig(enabled=True, expert_type="lora"), MoEState(), shared_router=Router(64, 4))
    calls = []
    fused = block(torch.ones(2, 5, 64))
    loop_forward = experts.forward
    experts.forward = lambda *a: calls.append("loop") or loop_forward(*a)
    x = torch.randn(2, 5, 64)
    y = block(x)
    assert not calls and y.shape == x.shape  # the loop did not run
    experts.fuse_with_shared = False  # the reference path, on request
    torch.testing.assert_close(block(torch.ones(2, 5, 64)), fused, rtol=1e-5, atol=1e-5)
    assert calls == ["loop"]
