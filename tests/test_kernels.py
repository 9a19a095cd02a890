"""The MoE block's custom ops (moe/kernels.py) equal plain PyTorch: on the CPU their reference
implementations and autograd wiring, on a CUDA GPU with Triton the kernels themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from medmoe.moe import StackedExperts, dispatch, kernels
from medmoe.moe.experts import is_gelu_tanh, use_fused_activations

E = 4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def bias_act_inputs(n: int, f: int, device="cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, f, generator=g).to(device, dtype)
    bias = torch.randn(E, f, generator=g).to(device, dtype)
    group = torch.randint(0, E, (n,), generator=g).sort().values.to(device)
    return h, bias, group


def check_bias_act(h, bias, group, act, tol):
    """Output and gradients (wrt h and bias) of kernels.bias_act against autograd on plain ops."""
    grad = torch.randn_like(h)
    outs = []
    for fused in (True, False):
        hh, bb = h.clone().requires_grad_(), bias.clone().requires_grad_()
        if fused:
            y = kernels.bias_act(hh, bb, group, act)
        else:
            pre = hh.float() + bb.float()[group]
            y = F.gelu(pre, approximate="tanh") if act == "gelu_tanh" else pre
        y.backward(grad)
        outs.append((y.detach(), hh.grad, bb.grad))
    for a, b in zip(*outs):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("act", ["gelu_tanh", "none"])
def test_bias_act_equals_plain_ops(act):
    check_bias_act(*bias_act_inputs(37, 24), act, 1e-6)


def test_bias_act_rejects_an_unknown_activation():
    h, bias, group = bias_act_inputs(3, 8)
    with pytest.raises(ValueError, match="act must be one of"):
        kernels.bias_act(h, bias, group, "relu")


def test_expert_matvec_picks_each_rows_expert():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 16, generator=g), torch.randn(E, 16, 24, generator=g)
    expert = torch.tensor([2, 0, 2])
    y = kernels.expert_matvec(x, w, expert)
    assert y.shape == (3, 24)
    for s in range(3):
        assert rel_err(y[s], x[s] @ w[expert[s]]) < 1e-6


def test_expert_matvec_op_agrees_with_its_fake_shapes():
    """The op returns split-K partial sums whose count the fake kernel predicts (torch.compile
    traces with the fake); opcheck also runs it under the other checks torch asks of custom ops."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 16, generator=g), torch.randn(E, 16, 24, generator=g)
    torch.library.opcheck(kernels._expert_matvec, (x, w, torch.tensor([1, 3])))
    assert kernels.matvec_splits(2, 16, 24, x.device) == (1, 16)


@pytest.mark.parametrize("s,k,n", [(1, 2560, 10240), (1, 10240, 2560), (2, 2560, 7680), (1, 100, 72), (8, 1536, 576)])
def test_planned_splits_cover_k_in_granules(s, k, n):
    splits, per_split = kernels.plan_splits(s, k, n, sms=132)
    assert per_split % kernels.MATVEC_GRANULE == 0
    assert (splits - 1) * per_split < k <= splits * per_split


def test_planned_splits_prefer_one_that_divides_k():
    # 352 blocks of N ask for 3 splits of K = 1280: 512 each leaves a masked tail; 640 divides it.
    assert kernels.plan_splits(1, 1280, 352 * 256, sms=132) == (2, 640)


@pytest.mark.parametrize("kind", ["gated", "mlp"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_one_token_path_equals_loop(kind, top_k):
    experts = StackedExperts(kind, E, 16, 24, True, True, ACT2FN["silu" if kind == "gated" else "gelu_new"])
    with torch.no_grad():
        experts.b_in.normal_()
        experts.b_out.normal_()
    x = torch.randn(1, 16)
    weight, index = torch.randn(1, E).softmax(-1).topk(top_k, dim=-1)
    ref = dispatch.loop(x, index, weight, E, experts.expert_forward)
    assert rel_err(dispatch.one_token_ffn(x, index, weight, experts), ref) < 1e-5


def test_fused_activations_replace_gelu_new_and_keep_the_function():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, hidden_act="gelu_new")
    torch.manual_seed(0)
    model = PhiForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    assert use_fused_activations(model) == 2
    assert all(is_gelu_tanh(layer.mlp.activation_fn) and isinstance(layer.mlp.activation_fn, torch.nn.GELU)
               for layer in model.model.layers)
    assert rel_err(model(ids).logits, before) < 1e-5
    assert use_fused_activations(model) == 0


def test_stacked_experts_know_which_activation_fuses():
    mlp = StackedExperts("mlp", E, 8, 16, True, True, ACT2FN["gelu_new"])
    gated = StackedExperts("gated", E, 8, 16, False, False, ACT2FN["silu"])
    relu = StackedExperts("mlp", E, 8, 16, True, True, ACT2FN["relu"])
    assert (mlp.fused_bias_act(), gated.fused_bias_act(), relu.fused_bias_act()) == ("gelu_tanh", None, None)


def test_linear_takes_the_one_row_kernel_only_where_it_applies(monkeypatch):
    calls = []

    class FakeTriton:  # stands in for the GPU kernel: records the call, computes the reference
        @staticmethod
        def linear_matvec(x, weight, bias):
            calls.append(tuple(x.shape))
            return F.linear(x, weight, bias)

    monkeypatch.setattr(kernels, "triton_ready", lambda t: True)
    monkeypatch.setattr(kernels, "_triton", lambda: FakeTriton)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 512, generator=g).bfloat16(), torch.randn(24, generator=g).bfloat16()
    for shape, taken in (((1, 1, 512), True), ((512,), True), ((2, 512), False), ((1, 3, 512), False)):
        x = torch.randn(*shape, generator=g).bfloat16()
        calls.clear()
        y = kernels.linear(x, w, b)
        assert y.shape == (*shape[:-1], 24) and bool(calls) == taken
        assert rel_err(y, F.linear(x.float(), w.float(), b.float())) < 1e-2
    calls.clear()
    kernels.linear(torch.randn(1, 500).bfloat16(), torch.randn(24, 500).bfloat16())  # K not a multiple of 256
    kernels.linear(torch.randn(1, 512), torch.randn(24, 512))  # fp32: cuBLAS is as good there
    kernels.linear(torch.randn(1, 512).bfloat16(), torch.randn(512, 24).bfloat16().T)  # not contiguous
    kernels.linear(torch.randn(1, 512).bfloat16(), w.clone().requires_grad_())  # a gradient wanted
    assert calls == []
    with torch.no_grad():
        kernels.linear(torch.randn(1, 512).bfloat16(), w.clone().requires_grad_())
    assert len(calls) == 1


def test_linear_matvec_op_agrees_with_its_fake_shapes():
    x, w, b = torch.randn(1, 512).bfloat16(), torch.randn(24, 512).bfloat16(), torch.randn(24).bfloat16()
    torch.library.opcheck(kernels._linear_matvec, (x, w))
    torch.library.opcheck(kernels._linear_matvec, (x, w, b))


# ----- on a CUDA GPU with Triton: the kernels themselves ----------------------------------------

def _triton_gpu() -> bool:
    return torch.cuda.is_available() and kernels.triton_ready(torch.empty(0, device="cuda"))


needs_triton = pytest.mark.skipif(not _triton_gpu(), reason="needs a CUDA GPU with Triton")


@needs_triton
@pytest.mark.parametrize("act", ["gelu_tanh", "none"])
@pytest.mark.parametrize("n,f", [(1, 8), (37, 1000), (4096, 2560)])
def test_triton_bias_act_equals_plain_ops(act, n, f):
    check_bias_act(*bias_act_inputs(n, f, "cuda", torch.bfloat16), act, 1e-2)


@needs_triton
@pytest.mark.parametrize("s,k,n", [(1, 2560, 10240), (2, 10240, 2560), (3, 100, 72)])
def test_triton_expert_matvec_equals_bmm(s, k, n):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(s, k, generator=g).cuda().bfloat16()
    w = (torch.randn(E, k, n, generator=g) * 0.02).cuda().bfloat16()
    expert = torch.randint(0, E, (s,), generator=g).cuda()
    ref = torch.bmm(x.float().unsqueeze(1), w.float()[expert]).squeeze(1)
    assert rel_err(kernels.expert_matvec(x, w, expert), ref) < 1e-2
    torch.library.opcheck(kernels._expert_matvec, (x, w, expert))  # the partials' count and dtype: as faked


@needs_triton
@pytest.mark.parametrize("k,n", [(2560, 17920), (12800, 2560), (256, 3), (768, 1000)])
def test_triton_linear_matvec_equals_linear(k, n):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, generator=g).cuda().bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.02).cuda().bfloat16()
    b = torch.randn(n, generator=g).cuda().bfloat16()
    assert kernels.linear_matvec_applies(x, w)
    assert rel_err(kernels.linear(x, w, b), F.linear(x.float(), w.float(), b.float())) < 1e-2
    assert rel_err(kernels.linear(x, w), F.linear(x.float(), w.float())) < 1e-2
    torch.library.opcheck(kernels._linear_matvec, (x, w))
    torch.library.opcheck(kernels._linear_matvec, (x, w, b))
