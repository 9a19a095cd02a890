"""Attention for one new token over a static KV cache, split along the keys (flash decoding).

At batch 1 a decode step's attention has one query per head: PyTorch's fused attention kernels
give each (batch, head) one program, 32 programs for a Phi-2-size model on a GPU of 132 SMs, and
on the H200 took 8 us per layer to read 8 MB of cache (docs/speed.md). Here the keys are split
into chunks so that every SM streams part of the cache; each program returns its chunk's softmax
statistics (running max, sum of exponentials, weighted sum of values) and the chunks are merged
outside the kernel, where torch.compile fuses the merge with what follows.

    decode_attention(query, key, value, bias, scale)   # query [B, H, 1, D], key/value [B, Hkv, L, D]

It is registered as the transformers attention implementation "medmoe_decode" (model/decode_kernels.py
switches to it on a GPU): one query position with an additive or boolean mask on a CUDA device
with Triton takes this kernel; everything else (prefill, the CPU) goes to transformers' SDPA.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..moe.kernels import triton_ready

ATTENTION_NAME = "medmoe_decode"
BLOCK_L, PROGRAMS_PER_SM = 32, 4


def attention_splits(rows: int, keys: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys_per_split) for `rows` = batch x query heads: about PROGRAMS_PER_SM programs
    per SM, chunks of whole BLOCK_L blocks; one split off CUDA. Shapes only (the fake uses it)."""
    if device.type != "cuda":
        return 1, keys
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = max(1, min(ceil(PROGRAMS_PER_SM * sms, max(rows, 1)), ceil(keys, BLOCK_L)))
    per_split = ceil(ceil(keys, target), BLOCK_L) * BLOCK_L
    return ceil(keys, per_split), per_split


def _reference_partials(q, k, v, bias, scale):
    """One split's statistics in PyTorch: q [B, H, D], k/v [B, Hkv, L, D], bias [B, L] (fp32)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    scores = torch.einsum("bhd,bhld->bhl", q.float() * scale, k) + bias[:, None, :]
    m = scores.amax(-1)
    p = (scores - m[..., None]).exp()
    return m[None], p.sum(-1)[None], torch.einsum("bhl,bhld->bhd", p, v)[None]


@torch.library.custom_op("medmoe::decode_attention_partials", mutates_args=())
def _partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if triton_ready(q):
        return _triton().partials(q, k, v, bias, scale)
    return _reference_partials(q, k, v, bias, scale)


@_partials.register_fake
def _(q, k, v, bias, scale):
    b, h, d = q.shape
    splits, _ = attention_splits(b * h, k.shape[2], q.device)
    stat = q.new_empty(splits, b, h, dtype=torch.float32)
    return stat, torch.empty_like(stat), q.new_empty(splits, b, h, d, dtype=torch.float32)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for one query per head: query [B, H, 1, D], key and value
    [B, Hkv, L, D] (H a multiple of Hkv), bias [B, L] additive (fp32; -inf allowed). -> [B, 1, H, D]."""
    m, s, acc = _partials(query[:, :, 0].contiguous(), key, value, bias.float(), float(scale))
    top = m.amax(0)
    w = (m - top).exp()  # a chunk whose keys were all masked weighs exp(-huge) = 0
    out = (acc * w[..., None]).sum(0) / (s * w).sum(0)[..., None]
    return out.to(query.dtype).unsqueeze(1)


def supported(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """One query position, a per-sample mask over the keys, the kernel's device and dtype."""
    return (query.shape[2] == 1 and mask is not None and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[2] == 1 and mask.shape[3] == key.shape[2] and query.shape[1] % key.shape[1] == 0
            and triton_ready(query))


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, L] boolean (True: attend) or additive mask -> [B, L] fp32 additive, finite."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape[0], mask.shape[3], device=mask.device).masked_fill_(
            ~mask[:, 0, 0], torch.finfo(torch.float32).min)
    return mask[:, 0, 0].float().clamp(min=torch.finfo(torch.float32).min)


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' attention interface: the kernel where it applies, SDPA elsewhere."""
    plain = (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
             and not kwargs.get("output_attentions", False))
    if plain and supported(query, key, attention_mask):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, mask_bias(attention_mask), scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Make "medmoe_decode" a transformers attention implementation (its masks: SDPA's); once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, decode_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


# ----- Triton ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton():
    if importlib.util.find_spec("triton") is None:
        return None
    return _build_kernel()


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def partials(q_ptr, k_ptr, v_ptr, bias_ptr, m_ptr, s_ptr, acc_ptr, H, GROUP, L, keys_per_split, scale,
                 stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        # Program (batch x head, chunk of keys): online softmax over the chunk, BLOCK_L keys at a time.
        row = tl.program_id(0)
        split = tl.program_id(1)
        b = row // H
        kv_head = (row % H) // GROUP
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(q_ptr + row * D + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh
        m = tl.full([], -float("inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = split * keys_per_split
        for l0 in tl.range(0, keys_per_split, BLOCK_L):
            offs_l = start + l0 + tl.arange(0, BLOCK_L)
            l_mask = offs_l < L
            tile_mask = l_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=tile_mask, other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            scores += tl.load(bias_ptr + b * L + offs_l, mask=l_mask, other=0.0)
            scores = tl.where(l_mask, scores, -float("inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=tile_mask, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            s = s * alpha + tl.sum(p, axis=0)
            m = m_new
        tl.store(m_ptr + split * tl.num_programs(0) + row, m)
        tl.store(s_ptr + split * tl.num_programs(0) + row, s)
        tl.store(acc_ptr + (split * tl.num_programs(0) + row) * D + offs_d, acc, mask=d_mask)

    class Kernel:
        @staticmethod
        def partials(q, k, v, bias, scale):
            b, h, d = q.shape
            keys = k.shape[2]
            splits, per_split = attention_splits(b * h, keys, q.device)
            m = torch.empty(splits, b, h, device=q.device, dtype=torch.float32)
            s = torch.empty_like(m)
            acc = torch.empty(splits, b, h, d, device=q.device, dtype=torch.float32)
            if k.stride(3) != 1:
                k = k.contiguous()
            if v.stride(3) != 1:
                v = v.contiguous()
            partials[(b * h, splits)](
                q, k, v, bias.contiguous(), m, s, acc, h, h // k.shape[1], keys, per_split, scale,
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_L=BLOCK_L, num_warps=4)
            return m, s, acc

    return Kernel
