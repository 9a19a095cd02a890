"""A decode step's attention over the slot cache, each row read only up to its own length
(engine/split_kv_attention.py): the PyTorch form against the masked attention the decode step
runs otherwise, the engine's step through it on the CPU, and its Triton kernels against the PyTorch
form (on a GPU, and on the CPU through Triton's interpreter where Triton is installed)."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from medmoe.engine import decode_attention, split_kv_attention
from medmoe.engine.prepare import prepare
from medmoe.moe import kernels
from test_decode_attention import TINY_PHI, slot_step, tiny_phi


def random_rows(batch, slots, heads, kv_heads, head_dim, span, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, head_dim, generator=g).to(device, dtype)
    keys = torch.randn(slots, kv_heads, span + 40, head_dim, generator=g).to(device, dtype)[:, :, :span]
    values = torch.randn(slots, kv_heads, span + 40, head_dim, generator=g).to(device, dtype)[:, :, :span]
    last = torch.randint(0, span, (batch,), generator=g)
    last[0] = 0  # a row that sees only its newest token
    last[-1] = span - 1  # and one that sees the whole span
    return query, keys, values, last.to(device)


def masked_attention(query, keys, values, last):
    """What the decode step computes without the kernels: every row over the whole span, an additive
    mask hiding the columns past its newest position (decode_step.DecodeStep._forward)."""
    b, heads = query.shape[:2]
    keys, values = keys[:b], values[:b]
    if keys.shape[1] != heads:
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        values = values.repeat_interleave(heads // values.shape[1], dim=1)
    visible = torch.arange(keys.shape[2])[None, :] <= last[:, None]
    bias = torch.full((b, 1, 1, keys.shape[2]), torch.finfo(query.dtype).min, dtype=query.dtype)
    bias.masked_fill_(visible[:, None, None, :], 0.0)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=1 / math.sqrt(query.shape[-1]))
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_reference_equals_the_masked_attention_of_the_decode_step(kv_heads):
    query, keys, values, last = random_rows(3, 5, 4, kv_heads, 16, 300)
    want = masked_attention(query, keys, values, last)
    got = split_kv_attention.attend_rows_reference(query, keys, values, last, 1 / math.sqrt(16))
    assert got.shape == (3, 1, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_op_agrees_with_its_fake_shapes():
    query, keys, values, last = random_rows(2, 3, 4, 2, 16, 64)
    torch.library.opcheck(split_kv_attention._attend_rows, (query, keys, values, last, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def test_off_by_default_and_on_the_cpu():
    query = torch.zeros(1, 4, 1, 16)
    assert not split_kv_attention.enabled
    assert not split_kv_attention.use(query)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_slot_cache_step_through_split_kv_equals_transformers_attention(kv_heads, monkeypatch):
    """The engine's decode step with the kernels' path switched on (their PyTorch form on the CPU):
    the fused layers hand their attention to it, and the logits are transformers'."""
    model = tiny_phi(kv_heads).eval()
    positions, tokens = [2, 9, 5], [7, 11, 250]
    want_logits, want_kv = slot_step(model, positions, tokens)
    prepare(model)
    calls = []
    op = split_kv_attention._attend_rows
    monkeypatch.setattr(split_kv_attention, "use", lambda query: True)
    monkeypatch.setattr(split_kv_attention, "_attend_rows", lambda *a: calls.append(a[3].tolist()) or op(*a))
    logits, kv = slot_step(model, positions, tokens)
    assert calls == [positions] * TINY_PHI["num_hidden_layers"]  # each layer, each row's newest position
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, want_kv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,heads,span,want", [(32, 32, 1024, 512), (1, 32, 1024, 64), (2, 4, 300, 128),
                                                  (64, 32, 4096, 4096)])
def test_chunks_fill_a_gpu_and_cover_the_span(rows, heads, span, want):
    chunk = split_kv_attention.chunk_tokens(rows, heads, span)
    assert chunk == want
    assert chunk % split_kv_attention.BLOCK_N == 0 and math.ceil(span / chunk) * chunk >= span


INTERPRETED = textwrap.dedent("""
    import math, torch
    from medmoe.engine import split_kv_attention as skv
    from test_split_kv_attention import random_rows
    for batch, slots, heads, kv_heads, head_dim, span in [(3, 4, 4, 4, 80, 300), (2, 3, 4, 2, 64, 256),
                                                          (1, 1, 2, 2, 16, 1024)]:
        query, keys, values, last = random_rows(batch, slots, heads, kv_heads, head_dim, span)
        want = skv.attend_rows_reference(query, keys, values, last, 1 / math.sqrt(head_dim))
        got = skv._triton_attend_rows(query, keys, values, last, 1 / math.sqrt(head_dim))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_in_the_interpreter_equal_the_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_ready(torch.empty(0, device="cuda"))),
                                  reason="the kernels run on a CUDA GPU with Triton")


@needs_triton
@pytest.mark.parametrize("batch,slots,heads,kv_heads,head_dim,span", [(32, 32, 32, 32, 80, 1024), (1, 4, 32, 32, 80, 256),
                                                                     (5, 8, 8, 2, 64, 512), (3, 3, 4, 4, 128, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_equal_the_reference(batch, slots, heads, kv_heads, head_dim, span, dtype):
    query, keys, values, last = random_rows(batch, slots, heads, kv_heads, head_dim, span, "cuda", dtype)
    want = split_kv_attention.attend_rows_reference(query, keys, values, last, 1 / math.sqrt(head_dim))
    got = split_kv_attention.attend_rows(query, keys, values, last, 1 / math.sqrt(head_dim))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_triton
def test_gpu_kernels_in_a_cuda_graph_follow_each_replays_lengths():
    query, keys, values, last = random_rows(4, 4, 8, 8, 80, 512, "cuda", torch.bfloat16)
    split_kv_attention.attend_rows(query, keys, values, last, 0.1)  # compile the kernels before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = split_kv_attention.attend_rows(query, keys, values, last, 0.1)
    for lengths in ([0, 5, 300, 511], [511, 64, 63, 1]):
        last.copy_(torch.tensor(lengths))
        graph.replay()
        want = split_kv_attention.attend_rows_reference(query, keys, values, last, 0.1)
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


@needs_triton
def test_gpu_engine_tokens_with_split_kv_are_the_masked_attentions(monkeypatch):
    from medmoe.bench import models
    from medmoe.bench.decode import engine_decode

    model = tiny_phi(device="cuda")
    ids, _, pixels = models.image_prompt(model, 3, 4, torch.device("cuda"), seed=2)
    prepare(model)
    want = engine_decode(model, ids, pixels, 12, {})
    calls = []
    op = split_kv_attention._attend_rows
    monkeypatch.setattr(split_kv_attention, "enabled", True)
    monkeypatch.setattr(split_kv_attention, "_attend_rows", lambda *a: calls.append(1) or op(*a))
    assert torch.equal(engine_decode(model, ids, pixels, 12, {}), want)
    assert len(calls) >= 10 * TINY_PHI["num_hidden_layers"]
    assert decode_attention.split_kv_attention is split_kv_attention
