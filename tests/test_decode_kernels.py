"""The one-token decode kernels (model/decode_kernels.py, model/decode_attention.py, the linear
matrix-vector op of moe/kernels.py) equal plain PyTorch: on the CPU their reference paths, custom-op
wiring and the model swap; on a CUDA GPU with Triton the kernels themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PhiConfig, PhiForCausalLM

from medmoe.model import decode_attention
from medmoe.model.decode_kernels import MatvecLinear, drop_decode_kernels, use_decode_kernels, uses_decode_kernels
from medmoe.moe import kernels
from medmoe.moe.kernels import plan_splits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def attention_inputs(b, h, hkv, keys, d, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, hkv, keys, d, generator=g), torch.randn(b, hkv, keys, d, generator=g)
    attend = torch.rand(b, keys, generator=g) > 0.3
    attend[:, 0] = True
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), attend.to(device)


def sdpa(q, k, v, attend, scale):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), attn_mask=attend[:, None, None, :],
                                          scale=scale).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    q, k, v, attend = attention_inputs(2, heads, kv_heads, 37, 16)
    bias = decode_attention.mask_bias(attend[:, None, None, :])
    out = decode_attention.decode_attention(q, k, v, bias, 0.25)
    assert out.shape == (2, 1, heads, 16)
    assert rel_err(out, sdpa(q, k, v, attend, 0.25)) < 1e-5


def test_decode_attention_mask_bias_takes_boolean_and_additive_masks():
    attend = torch.tensor([[True, False, True]])
    additive = torch.tensor([[0.0, float("-inf"), 0.0]])
    for mask in (attend[:, None, None, :], additive[:, None, None, :]):
        bias = decode_attention.mask_bias(mask)
        assert bias.dtype == torch.float32 and torch.isfinite(bias).all()
        assert bias[0, 0] == 0 and bias[0, 1] < -1e38


def test_decode_attention_op_agrees_with_its_fake_shapes():
    q, k, v, attend = attention_inputs(1, 4, 2, 9, 8)
    bias = decode_attention.mask_bias(attend[:, None, None, :])
    torch.library.opcheck(decode_attention._partials, (q[:, :, 0].contiguous(), k, v, bias, 0.5))


def test_attention_splits_cover_the_keys_in_whole_blocks():
    assert decode_attention.attention_splits(32, 768, torch.device("cpu")) == (1, 768)


def test_linear_matvec_equals_linear_and_its_fake_shapes():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    assert rel_err(kernels.linear_matvec(x, w, b), F.linear(x, w, b)) < 1e-6
    assert kernels.linear_matvec(x[None], w).shape == (1, 1, 40)
    torch.library.opcheck(kernels._linear_matvec, (x, w))


@pytest.mark.parametrize("k_contiguous", [False, True])
@pytest.mark.parametrize("s,k,n", [(1, 2560, 10240), (1, 10240, 2560), (1, 2560, 7680), (1, 100, 72), (8, 1536, 576)])
def test_planned_splits_cover_k_in_granules(k_contiguous, s, k, n):
    splits, per_split = plan_splits(s, k, n, 132, k_contiguous)
    granule = 256 if k_contiguous else 128
    assert per_split % granule == 0
    assert (splits - 1) * per_split < k <= splits * per_split


def test_planned_splits_prefer_one_that_divides_k():
    splits, per_split = plan_splits(1, 2560, 10240, 132, True)
    assert 2560 % per_split == 0 and splits > 1


def tiny_phi():
    cfg = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    attn_implementation="sdpa")
    torch.manual_seed(0)
    return PhiForCausalLM(cfg).eval()


def test_use_decode_kernels_swaps_linears_and_attention_and_back():
    model = tiny_phi()
    keys = set(model.state_dict())
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    assert use_decode_kernels(model) == 2 * 6  # q, k, v, dense, fc1, fc2 per layer; not the LM head
    assert uses_decode_kernels(model) and type(model.lm_head) is nn.Linear
    assert model.config._attn_implementation == decode_attention.ATTENTION_NAME
    assert set(model.state_dict()) == keys
    with torch.no_grad():  # on the CPU the kernels do not apply: the same computation
        assert torch.equal(model(ids).logits, before)
    assert drop_decode_kernels(model) == 12
    assert not any(isinstance(m, MatvecLinear) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


# ----- on a CUDA GPU with Triton: the kernels themselves ----------------------------------------

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.triton_ready(torch.empty(0, device="cuda"))),
    reason="needs a CUDA GPU with Triton")


@needs_triton
@pytest.mark.parametrize("n,k", [(10240, 2560), (2560, 10240), (7680, 2560), (2560, 2560), (72, 100), (1536, 576)])
def test_triton_linear_matvec_equals_linear(n, k):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, k, generator=g).cuda().bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.02).cuda().bfloat16()
    b = torch.randn(n, generator=g).cuda().bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    assert rel_err(kernels.linear_matvec(x, w, b), ref) < 1e-2
    torch.library.opcheck(kernels._linear_matvec, (x, w))


@needs_triton
@pytest.mark.parametrize("b,heads,kv_heads,keys,d", [(1, 32, 32, 768, 80), (2, 6, 2, 100, 64), (3, 4, 4, 33, 16)])
def test_triton_decode_attention_equals_sdpa(b, heads, kv_heads, keys, d):
    q, k, v, attend = attention_inputs(b, heads, kv_heads, keys, d, "cuda", torch.bfloat16)
    bias = decode_attention.mask_bias(attend[:, None, None, :])
    assert rel_err(decode_attention.decode_attention(q, k, v, bias, d ** -0.5), sdpa(q, k, v, attend, d ** -0.5)) < 1e-2
    torch.library.opcheck(decode_attention._partials, (q[:, :, 0].contiguous(), k, v, bias, d ** -0.5))


@needs_triton
def test_triton_decode_kernels_keep_a_models_decode_step():
    """One cached decode step of a small Phi (fp32 on the GPU): logits with the kernels equal those without."""
    from transformers import StaticCache

    from medmoe.model.modeling import cache_argument

    model = tiny_phi().cuda()
    ids = torch.randint(0, 64, (1, 9), device="cuda")
    logits = []
    for kernels_on in (False, True):
        if kernels_on:
            use_decode_kernels(model)
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids, use_cache=True, **{cache_argument(model): cache})
            step = model(ids[:, -1:], use_cache=True, cache_position=torch.tensor([9], device="cuda"),
                         **{cache_argument(model): cache}).logits
        logits.append(step)
    assert rel_err(logits[1], logits[0]) < 1e-4


@needs_triton
def test_one_token_router_equals_linear():
    from medmoe.moe.router import Router

    router = Router(64, 4).cuda()
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(router(x), F.linear(x.float(), router.weight, router.bias)) < 1e-5
