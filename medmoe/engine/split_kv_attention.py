"""Inference only: a decode step's attention over the engine's slot cache, each row read only up to
its own length (split-KV, "flash decoding").

At a decode step every row of the slot cache attends with one query over its own tokens. The
attention function transformers calls reads every row up to the step's span (the longest row
rounded up to the cache's 256-token bucket) and masks the rest, so rows shorter than the longest
are read in full anyway. Here each (row, head) is split into chunks of the span; a program
attends over one chunk up to the row's length and keeps its running maximum, its sum of
exponentials and its weighted values; a second kernel joins a row's chunks:

    out = attend_rows(query, keys, values, last, scaling)

query [B, H, 1, D] (rotated, as `decode_attention.rotary_cache_write_rows` returns it), keys and
values [S, Hkv, L, D] with S >= B (a slot-cache layer, the last two dims contiguous), last an
integer [B] on the device, each row's newest position (row b attends to tokens 0 .. last[b], as
the slot cache's `write_at`) -> out [B, 1, H, D], the layout transformers' attention functions
return. On a GPU with Triton it is two kernels with a grid fixed by the shapes (CUDA-graph safe);
a program past its row's end reads nothing (its reads are masked off). Elsewhere it is
`attend_rows_reference`.

Off unless `enabled` is set (`RuntimeOptions.split_kv_attention`, `medmoe serve --split-kv-attention`,
`medmoe bench --split-kv-attention`).
"""

from __future__ import annotations

import functools
import math

import torch

from ..moe import kernels

enabled = False  # RuntimeOptions.split_kv_attention

BLOCK_N = 64  # tokens a program reads at once


def attend_rows_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """The same in PyTorch: a softmax over each row's tokens 0 .. last[b] (fp32 scores)."""
    b, heads, _, d = query.shape
    kv_heads = keys.shape[1]
    keys, values = keys[:b], values[:b]
    if kv_heads != heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scaling  # [B, H, 1, L]
    columns = torch.arange(keys.shape[2], device=query.device)
    scores = scores.masked_fill((columns[None, :] > last[:, None])[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ values.float()  # [B, H, 1, D]
    return out.transpose(1, 2).to(query.dtype)


def use(query: torch.Tensor) -> bool:
    """Whether a decode step with this query runs `attend_rows`' kernels."""
    return enabled and kernels.triton_ready(query)


def chunk_tokens(rows: int, heads: int, span: int) -> int:
    """Tokens a program covers: enough programs to fill a GPU (about 2,000) without chunks shorter
    than one read."""
    splits = max(1, min(span // BLOCK_N, math.ceil(2048 / (rows * heads))))
    return BLOCK_N * math.ceil(span / (splits * BLOCK_N))


@torch.library.custom_op("medmoe::attend_rows", mutates_args=())
def _attend_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    if kernels.triton_ready(query):
        return _triton_attend_rows(query, keys, values, last, scaling)
    return attend_rows_reference(query, keys, values, last, scaling)


@_attend_rows.register_fake
def _(query, keys, values, last, scaling):
    b, heads, _, d = query.shape
    return query.new_empty(b, 1, heads, d)


def attend_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """See the module docstring."""
    return _attend_rows(query.contiguous(), keys, values, last.contiguous(), float(scaling))


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, last_ptr, acc_ptr, max_ptr, sum_ptr,
                       row_stride, head_stride, groups, splits, scaling,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        heads = tl.num_programs(1)
        length = tl.load(last_ptr + b).to(tl.int32) + 1
        start = s * CHUNK
        end = tl.minimum(start + CHUNK, length)
        d = tl.arange(0, BLOCK_D)
        in_head = d < D
        q = tl.load(q_ptr + (b * heads + h) * D + d, mask=in_head, other=0.0).to(tl.float32) * scaling
        base = b * row_stride + (h // groups) * head_stride
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for i in range(0, CHUNK // BLOCK_N):  # a fixed count: past the row's end the reads are masked off
            n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            in_row = n < end
            at = base + n[:, None] * D + d[None, :]
            tile = in_row[:, None] & in_head[None, :]
            k = tl.load(k_ptr + at, mask=tile, other=0.0).to(tl.float32)
            scores = tl.where(in_row, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing read yet: no inf - inf
            alpha = tl.exp(m_i - shift)
            p = tl.exp(scores - shift)
            v = tl.load(v_ptr + at, mask=tile, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        at = (b * heads + h) * splits + s
        tl.store(acc_ptr + at * BLOCK_D + d, acc)
        tl.store(max_ptr + at, m_i)
        tl.store(sum_ptr + at, l_i)

    @triton.jit
    def combine_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, splits,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        heads = tl.num_programs(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        at = (b * heads + h) * splits + s
        in_split = s < splits
        m = tl.load(max_ptr + at, mask=in_split, other=float("-inf"))
        top = tl.max(m, axis=0)
        weight = tl.where(in_split & (m > float("-inf")), tl.exp(m - top), 0.0)
        total = tl.sum(tl.load(sum_ptr + at, mask=in_split, other=0.0) * weight, axis=0)
        acc = tl.load(acc_ptr + at[:, None] * BLOCK_D + d[None, :], mask=in_split[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(out_ptr + (b * heads + h) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)

    return triton, partial_kernel, combine_kernel


def _triton_attend_rows(query, keys, values, last, scaling):
    triton, partial_kernel, combine_kernel = _kernels()
    b, heads, _, d = query.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    if keys.stride() != values.stride() or keys.stride(-1) != 1 or keys.stride(-2) != d:
        raise ValueError(f"keys and values need the same strides, the last two dims contiguous: {keys.stride()}, "
                         f"{values.stride()}")
    chunk = chunk_tokens(b, heads, span)
    splits = math.ceil(span / chunk)
    block_d = triton.next_power_of_2(d)
    acc = torch.empty(b, heads, splits, block_d, dtype=torch.float32, device=query.device)
    top = torch.empty(b, heads, splits, dtype=torch.float32, device=query.device)
    total = torch.empty_like(top)
    partial_kernel[(b, heads, splits)](query, keys, values, last, acc, top, total,
                                       keys.stride(0), keys.stride(1), heads // kv_heads, splits, scaling,
                                       D=d, BLOCK_D=block_d, BLOCK_N=BLOCK_N, CHUNK=chunk, num_warps=4)
    out = query.new_empty(b, 1, heads, d)
    combine_kernel[(b, heads)](acc, top, total, out, splits, D=d, BLOCK_D=block_d,
                               BLOCK_S=max(triton.next_power_of_2(splits), 2), num_warps=1)
    return out
