"""Attention for one new token over a static KV cache, split along the keys (flash decoding).

At batch 1 a decode step's attention has one query per head, and PyTorch's fused attention kernels
give each (batch, head) one program: 32 programs on the 132 SMs of an H200 for a Phi-2-size model,
9.7 us per layer to read 8 MB of cache (docs/speed.md, run H). Here every CHUNK keys of every head
are one program, which loads its keys and values at once (no loop: the loads are in flight
together) and returns its chunk's softmax statistics: the maximum score, the sum of exponentials
and the weighted sum of values. The chunks are merged outside the kernel, in PyTorch, where
torch.compile fuses the merge with what follows.

    decode_attention(query, key, value, bias, scale)   # query [B, H, 1, D], key/value [B, Hkv, L, D]

It is the transformers attention implementation "medmoe_decode" (`use_decode_attention(lm)`;
`load_for_inference` switches to it on a GPU): one query position with a per-sample 4-D mask on a
CUDA device with Triton takes this kernel; everything else (prefill, the CPU) goes to SDPA.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..moe.kernels import triton_ready

ATTENTION_NAME = "medmoe_decode"
CHUNK = 64  # keys per program


def splits(keys: int) -> int:
    return -(-keys // CHUNK)


def _reference_partials(q, k, v, bias, scale):
    """The kernel in PyTorch: q [B, H, D], k/v [B, Hkv, L, D], bias [B, L] fp32 additive ->
    per chunk of CHUNK keys: max score [S, B, H], sum of exponentials [S, B, H], weighted values [S, B, H, D]."""
    b, h, d = q.shape
    group = h // k.shape[1]
    n, keys = splits(k.shape[2]), k.shape[2]
    pad = n * CHUNK - keys
    k = torch.nn.functional.pad(k.repeat_interleave(group, 1).float(), (0, 0, 0, pad))
    v = torch.nn.functional.pad(v.repeat_interleave(group, 1).float(), (0, 0, 0, pad))
    bias = torch.nn.functional.pad(bias.float(), (0, pad), value=float("-inf"))
    scores = torch.einsum("bhd,bhld->bhl", q.float() * scale, k) + bias[:, None, :]
    scores = scores.reshape(b, h, n, CHUNK)
    m = scores.amax(-1)
    p = (scores - m[..., None]).exp()
    acc = torch.einsum("bhnc,bhncd->bhnd", p, v.reshape(b, h, n, CHUNK, d))
    return m.permute(2, 0, 1).contiguous(), p.sum(-1).permute(2, 0, 1).contiguous(), acc.permute(2, 0, 1, 3).contiguous()


@torch.library.custom_op("medmoe::decode_attention_partials", mutates_args=())
def _partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if triton_ready(q):
        return _triton().partials(q, k, v, bias, scale)
    return _reference_partials(q, k, v, bias, scale)


@_partials.register_fake
def _(q, k, v, bias, scale):
    b, h, d = q.shape
    stat = q.new_empty(splits(k.shape[2]), b, h, dtype=torch.float32)
    return stat, torch.empty_like(stat), q.new_empty(*stat.shape, d, dtype=torch.float32)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for one query per head: query [B, H, 1, D], key and value
    [B, Hkv, L, D] (H a multiple of Hkv), bias [B, L] additive and finite. -> [B, 1, H, D]."""
    m, s, acc = _partials(query[:, :, 0].contiguous(), key, value, bias, float(scale))
    w = (m - m.amax(0)).exp()  # a chunk whose keys were all masked weighs exp(-huge) = 0
    out = (acc * w[..., None]).sum(0) / (s * w).sum(0)[..., None]
    return out.to(query.dtype).unsqueeze(1)


def supported(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """One query position, a per-sample mask over the keys, the kernel's device."""
    return (query.shape[2] == 1 and mask is not None and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[2] == 1 and mask.shape[3] == key.shape[2] and query.shape[1] % key.shape[1] == 0
            and query.shape[-1] <= 256 and triton_ready(query))


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


def use_decode_attention(lm: nn.Module) -> bool:
    """Switch a transformers LM from SDPA to "medmoe_decode" (which is SDPA except for one-token
    steps); True if it switched. Other implementations (eager, flash) are left as they are."""
    if lm.config._attn_implementation != "sdpa":
        return False
    lm.set_attn_implementation(register())
    return True


def drop_decode_attention(lm: nn.Module) -> None:
    if lm.config._attn_implementation == ATTENTION_NAME:
        lm.set_attn_implementation("sdpa")


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
    def partials(q_ptr, k_ptr, v_ptr, bias_ptr, m_ptr, s_ptr, acc_ptr, H, GROUP, L, scale,
                 stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
        # Program (batch x head, chunk of keys): the chunk's keys and values are loaded before any
        # arithmetic, so both reads are in flight at once.
        row = tl.program_id(0)
        split = tl.program_id(1)
        b = row // H
        kv_head = (row % H) // GROUP
        offs_l = split * CHUNK + tl.arange(0, CHUNK)
        offs_d = tl.arange(0, BLOCK_D)
        l_mask = offs_l < L
        tile_mask = l_mask[:, None] & (offs_d < D)[None, :]
        k_ptrs = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :]
        v_ptrs = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :]
        k = tl.load(k_ptrs, mask=tile_mask, other=0.0)
        v = tl.load(v_ptrs, mask=tile_mask, other=0.0)
        bias = tl.load(bias_ptr + b * L + offs_l, mask=l_mask, other=-float("inf"))
        q = tl.load(q_ptr + row * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32) * scale
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) + bias
        m = tl.max(scores, axis=0)
        p = tl.exp(scores - m)
        n = tl.num_programs(0)
        tl.store(m_ptr + split * n + row, m)
        tl.store(s_ptr + split * n + row, tl.sum(p, axis=0))
        tl.store(acc_ptr + (split * n + row) * D + offs_d, tl.sum(p[:, None] * v.to(tl.float32), axis=0),
                 mask=offs_d < D)

    class Kernel:
        @staticmethod
        def partials(q, k, v, bias, scale):
            b, h, d = q.shape
            keys = k.shape[2]
            n = splits(keys)
            m = torch.empty(n, b, h, device=q.device, dtype=torch.float32)
            s = torch.empty_like(m)
            acc = torch.empty(n, b, h, d, device=q.device, dtype=torch.float32)
            if k.stride(3) != 1:
                k = k.contiguous()
            if v.stride(3) != 1:
                v = v.contiguous()
            partials[(b * h, n)](
                q, k, v, bias.contiguous(), m, s, acc, h, h // k.shape[1], keys, scale,
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                D=d, BLOCK_D=triton.next_power_of_2(d), CHUNK=CHUNK, num_warps=4)
            return m, s, acc

    return Kernel
