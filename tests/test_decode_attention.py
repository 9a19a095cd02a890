"""Phi's one-token attention step with the rotary embedding and the cache write in one op
(engine/decode_attention.py): the same logits, cache and cache length as transformers' attention, on
the CPU by the op's PyTorch form, on a CUDA GPU by its Triton kernel."""

import pytest
import torch
from transformers import StaticCache

from medmoe.bench import models
from medmoe.engine.static_decode import decode
from medmoe.engine import decode_attention
from medmoe.engine.fused_layers import count_one_token
from medmoe.engine.prepare import prepare, unprepare
from medmoe.model.modeling import cache_argument
from medmoe.moe import kernels

TINY_PHI = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def tiny_phi(kv_heads: int = 4, device: str = "cpu"):
    torch.manual_seed(0)
    return models.phi2_medmoe(torch.device(device), torch.float32, text={**TINY_PHI, "num_key_value_heads": kv_heads})


def step_after_prompt(lm, prompt: torch.Tensor, token: torch.Tensor):
    """Logits of one token after `prompt` with a static cache, and the cache's layers afterwards."""
    cache = StaticCache(config=lm.config, max_cache_len=16)
    with torch.no_grad():
        lm(input_ids=prompt, use_cache=True, **{cache_argument(lm): cache})
        positions = torch.full_like(token, prompt.shape[1])
        logits = lm(input_ids=token, position_ids=positions, use_cache=True, **{cache_argument(lm): cache}).logits
    return logits, [(layer.keys.clone(), layer.values.clone(), int(layer.cumulative_length)) for layer in cache.layers]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("fused", [False, True])
def test_one_token_step_equals_transformers_attention(kv_heads, fused, monkeypatch):
    lm = tiny_phi(kv_heads).language_model.eval()
    calls = []
    op = decode_attention._rotary_cache_write
    monkeypatch.setattr(decode_attention, "_rotary_cache_write", lambda *a: calls.append(1) or op(*a))
    g = torch.Generator().manual_seed(1)
    prompt, token = torch.randint(0, 250, (2, 5), generator=g), torch.randint(0, 250, (2, 1), generator=g)
    want_logits, want_cache = step_after_prompt(lm, prompt, token)
    if fused:  # the fused layers call the op themselves, as a GPU runs them (the MoE experts' overlap included)
        assert prepare(lm).decode_attention_layers == TINY_PHI["num_hidden_layers"]
        assert decode_attention.count_installed(lm) == 0
    else:
        assert decode_attention.install(lm) == TINY_PHI["num_hidden_layers"]
        assert decode_attention.count_installed(lm) == TINY_PHI["num_hidden_layers"]
    logits, cache = step_after_prompt(lm, prompt, token)
    assert len(calls) == TINY_PHI["num_hidden_layers"]  # the step's, not the prompt's
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    for (keys, values, length), (want_keys, want_values, want_length) in zip(cache, want_cache):
        assert length == want_length == 6  # five prompt tokens and the step's
        torch.testing.assert_close(keys, want_keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-6)


def test_decode_tokens_are_transformers_and_uninstall_restores_the_modules():
    model = tiny_phi()
    ids, mask, pixels = models.image_prompt(model, 2, 4, torch.device("cpu"), seed=2)
    keys = set(model.state_dict())
    want = decode(model, ids, mask, pixels, max_new_tokens=6)
    attentions = [layer.self_attn for layer in model.language_model.model.layers]
    assert prepare(model).decode_attention_layers == TINY_PHI["num_hidden_layers"]
    assert torch.equal(decode(model, ids, mask, pixels, max_new_tokens=6), want)
    unprepare(model)
    assert count_one_token(model) == decode_attention.count_installed(model) == 0
    assert [layer.self_attn for layer in model.language_model.model.layers] == attentions  # the same modules back
    assert not any(hasattr(m, "decode_counter") for m in model.modules())
    assert set(model.state_dict()) == keys
    assert prepare(model, decode_attention_kernel=False).decode_attention_layers == 0


def random_step_inputs(batch, heads, kv_heads, head_dim, rotary, max_len, device, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    # q, k and v as views of one product with a bias part after them, as the fused product hands them over
    product = r(batch, 1, (heads + 2 * kv_heads + 3) * head_dim)
    q, k, v, _ = product.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim, 3 * head_dim], dim=-1)
    cos, sin = r(batch, 1, rotary), r(batch, 1, rotary)
    keys, values = r(batch, kv_heads, max_len, head_dim), r(batch, kv_heads, max_len, head_dim)
    length = torch.tensor(3, device=device)
    return q, k, v, cos, sin, keys, values, length, torch.zeros(1, dtype=torch.int32, device=device)


def reference_step(q, k, v, cos, sin, keys, values, length, counter):
    d = keys.shape[-1]
    heads = lambda t: t.float().reshape(t.shape[0], 1, -1, d).transpose(1, 2)  # noqa: E731
    keys, values = keys.float().clone(), values.float().clone()
    keys[:, :, int(length)] = decode_attention._rotate(heads(k), cos.float(), sin.float())[:, :, 0]
    values[:, :, int(length)] = heads(v)[:, :, 0]
    return decode_attention._rotate(heads(q), cos.float(), sin.float()), keys, values


def test_op_agrees_with_its_fake_shapes_and_the_reference():
    args = random_step_inputs(2, 4, 2, 16, 6, 8, "cpu", torch.float32)
    want_query, want_keys, want_values = reference_step(*args)
    query = decode_attention.rotary_cache_write(*args)
    torch.testing.assert_close(query, want_query)
    torch.testing.assert_close(args[5], want_keys)
    torch.testing.assert_close(args[6], want_values)
    assert int(args[7]) == 4
    torch.library.opcheck(decode_attention._rotary_cache_write, random_step_inputs(1, 4, 4, 16, 16, 8, "cpu", torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


# ----- the engine's slot cache: a position per row ----------------------------------------------------

def slot_step(model, positions, tokens):
    """Logits of one engine decode step (rows at their own `positions`) over a slot cache of random
    keys and values, and the cache's buffer afterwards."""
    from medmoe.engine.decode_step import DecodeStep
    from medmoe.engine.slot_cache import SlotCache

    lm = model.language_model
    cache = SlotCache(lm.config, slots=4, max_len=16, dtype=torch.float32, device=torch.device("cpu"))
    cache.reserve(16)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(4)))
    step = DecodeStep(model, cache, cuda_graphs=False)
    n = len(positions)
    step.tokens[:n] = torch.tensor(tokens)
    step.positions[:n] = torch.tensor(positions)
    with torch.no_grad():
        logits = step(n, max(positions) + 1)
    return logits, cache.kv.clone()


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("fused", [False, True])
def test_slot_cache_step_equals_transformers_attention(kv_heads, fused, monkeypatch):
    model = tiny_phi(kv_heads).eval()
    calls = []
    op = decode_attention._rotary_cache_write_rows
    monkeypatch.setattr(decode_attention, "_rotary_cache_write_rows", lambda *a: calls.append(1) or op(*a))
    positions, tokens = [2, 9, 5], [7, 11, 250]
    want_logits, want_kv = slot_step(model, positions, tokens)
    assert not calls
    if fused:
        prepare(model)
    else:
        decode_attention.install(model.language_model)
    logits, kv = slot_step(model, positions, tokens)
    assert len(calls) == TINY_PHI["num_hidden_layers"]
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, want_kv, rtol=1e-5, atol=1e-6)
    fresh = torch.randn(kv.shape, generator=torch.Generator().manual_seed(4))
    written = torch.zeros(kv.shape[:5], dtype=torch.bool)
    for row, position in enumerate(positions):
        written[:, :, row, :, position] = True
    assert not torch.equal(kv[written.nonzero(as_tuple=True)], fresh[written.nonzero(as_tuple=True)])
    assert torch.equal(kv[~written], fresh[~written])  # every other position, and the free slot, as it was


def random_rows_inputs(batch, slots, heads, kv_heads, head_dim, rotary, max_len, device, dtype, seed=5):
    q, k, v, cos, sin, _, _, _, _ = random_step_inputs(batch, heads, kv_heads, head_dim, rotary, max_len, device, dtype,
                                                       seed)
    g = torch.Generator().manual_seed(seed + 1)
    kv = torch.randn(2, 3, slots, kv_heads, max_len, head_dim, generator=g).to(device, dtype)  # [2, layers, ...]
    positions = torch.randperm(max_len, generator=g)[:batch].to(device)
    return q, k, v, cos, sin, kv[0, 1], kv[1, 1], positions


def reference_rows(q, k, v, cos, sin, keys, values, positions):
    d = keys.shape[-1]
    heads = lambda t: t.float().reshape(t.shape[0], 1, -1, d).transpose(1, 2)  # noqa: E731
    keys, values = keys.float().clone(), values.float().clone()
    for row, position in enumerate(positions.tolist()):
        keys[row, :, position] = decode_attention._rotate(heads(k), cos.float(), sin.float())[row, :, 0]
        values[row, :, position] = heads(v)[row, :, 0]
    return decode_attention._rotate(heads(q), cos.float(), sin.float()), keys, values


def test_rows_op_agrees_with_its_fake_shapes_and_the_reference():
    args = random_rows_inputs(2, 3, 4, 2, 16, 6, 8, "cpu", torch.float32)
    want_query, want_keys, want_values = reference_rows(*args)
    positions = args[7].clone()
    query = decode_attention.rotary_cache_write_rows(*args)
    torch.testing.assert_close(query, want_query)
    torch.testing.assert_close(args[5], want_keys)
    torch.testing.assert_close(args[6], want_values)
    assert torch.equal(args[7], positions)  # read, not advanced
    torch.library.opcheck(decode_attention._rotary_cache_write_rows,
                          random_rows_inputs(1, 2, 4, 4, 16, 16, 8, "cpu", torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


# ----- on a CUDA GPU with Triton: the kernel ---------------------------------------------------------

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_ready(torch.empty(0, device="cuda"))),
                                  reason="needs a CUDA GPU with Triton")


@needs_triton
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,rotary", [(1, 32, 32, 80, 32), (3, 8, 2, 64, 64), (2, 4, 4, 16, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_equals_the_reference(batch, heads, kv_heads, head_dim, rotary, dtype):
    args = random_step_inputs(batch, heads, kv_heads, head_dim, rotary, 16, "cuda", dtype)
    want_query, want_keys, want_values = reference_step(*args)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    query = decode_attention.rotary_cache_write(*args)
    torch.testing.assert_close(query.float(), want_query, **tol)
    torch.testing.assert_close(args[5].float(), want_keys, **tol)  # slot 3 written, every other slot as it was
    torch.testing.assert_close(args[6].float(), want_values, **tol)
    assert int(args[7]) == 4 and int(args[8]) == 0  # the length advanced once; the counter left at zero


@needs_triton
def test_triton_kernel_in_a_cuda_graph_writes_the_next_slot_on_each_replay():
    q, k, v, cos, sin, keys, values, length, counter = random_step_inputs(1, 4, 4, 16, 6, 8, "cuda", torch.float32)
    decode_attention.rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter)  # warm-up: slot 3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention.rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert int(length) == 6
    for slot in (3, 4, 5):
        torch.testing.assert_close(values[0, :, slot], v.reshape(4, 16))


@needs_triton
def test_gpu_decode_tokens_are_transformers():
    model = tiny_phi(device="cuda")
    ids, mask, pixels = models.image_prompt(model, 2, 4, torch.device("cuda"), seed=2)
    want = decode(model, ids, mask, pixels, max_new_tokens=8)
    assert prepare(model).decode_attention_layers == TINY_PHI["num_hidden_layers"]
    assert torch.equal(decode(model, ids, mask, pixels, max_new_tokens=8), want)


@needs_triton
@pytest.mark.parametrize("batch,slots,heads,kv_heads,head_dim,rotary", [(1, 1, 32, 32, 80, 32), (3, 4, 8, 2, 64, 64),
                                                                         (2, 8, 4, 4, 16, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_rows_kernel_equals_the_reference(batch, slots, heads, kv_heads, head_dim, rotary, dtype):
    args = random_rows_inputs(batch, slots, heads, kv_heads, head_dim, rotary, 16, "cuda", dtype)
    want_query, want_keys, want_values = reference_rows(*args)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    query = decode_attention.rotary_cache_write_rows(*args)
    torch.testing.assert_close(query.float(), want_query, **tol)
    torch.testing.assert_close(args[5].float(), want_keys, **tol)  # each row's position written, nothing else
    torch.testing.assert_close(args[6].float(), want_values, **tol)


@needs_triton
def test_gpu_engine_tokens_with_the_rows_kernel_are_transformers():
    from medmoe.bench.decode import engine_decode

    model = tiny_phi(device="cuda")
    ids, _, pixels = models.image_prompt(model, 3, 4, torch.device("cuda"), seed=2)
    prepare(model, decode_attention_kernel=False)
    want = engine_decode(model, ids, pixels, 12, {})
    unprepare(model)
    prepare(model)
    stats = {}
    assert torch.equal(engine_decode(model, ids, pixels, 12, stats), want)
    assert stats["steps"] >= 10
    # fp32 experts take the host-synced loop, so these steps run eagerly; the kernel inside CUDA graphs
    # (bf16) is test_engine_gpu.py's test_graph_steps_equal_eager_steps.
