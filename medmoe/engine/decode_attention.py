"""Inference only: Phi's attention for one new token with a static cache, rotary embedding and cache
write in one kernel.

transformers' Phi attention, for each layer of a decode step, splits the query and key into the
rotated and the passed-through parts, rotates, joins the parts again and writes key and value into
the cache: torch.compile makes five kernels of that (the rotation, two joins, two cache writes),
each about a microsecond of work and a launch, 160 per step of Phi-2 on the step's critical path.
Here one op does all of it:

    query = rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter)

reads the projections' outputs as they are ([B, 1, heads * head_dim], views of the fused product
are fine), rotates the first `cos.shape[-1]` features of each query and key head, writes key and
value at slot `length` of the layer's cache, advances `length` (transformers' StaticLayer
`cumulative_length`) and returns the query [B, heads, 1, head_dim]. On a GPU with Triton it is one
kernel (one program per batch row and head); elsewhere the same in PyTorch. The engine's slot cache
(slot_cache.py) gives each row its own position, so its form takes them per row and advances
nothing (the engine moves its positions on after the step):

    query = rotary_cache_write_rows(q, k, v, cos, sin, keys, values, positions)

The fused Phi modules (engine/fused_layers.py) run the attention themselves and call the op on their
one-token path: `one_token_layer` says whether a step writes into a cache layer the op knows,
`one_token_inputs` runs it. A Phi attention left unfused gets the same path from
`PhiDecodeAttention`, which holds transformers' `PhiAttention` and runs the op on its one-token
path with a static cache or a slot cache; any other call (a prompt, a dynamic cache, training)
runs transformers' attention as it is. The op sits before transformers' attention-function seam
(`AttentionInterface` receives keys already rotated and written), so the module is replaced
instead: `install` puts one in place of each PhiAttention, once (`engine.prepare` calls it after
fusing), and `uninstall` puts them back.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.cache_utils import StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi.modeling_phi import PhiAttention, eager_attention_forward

from ..moe import kernels
from .slot_cache import SlotCache, SlotLayer


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' partial rotary embedding: x [B, H, 1, D], cos/sin [B, 1, R], R <= D."""
    r = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat((-rot[..., r // 2:], rot[..., : r // 2]), dim=-1)
    return torch.cat((rot * c + half * s, rest), dim=-1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.reshape(x.shape[0], 1, -1, head_dim).transpose(1, 2)


@torch.library.custom_op("medmoe::rotary_cache_write", mutates_args=("keys", "values", "length", "counter"))
def _rotary_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                        counter: torch.Tensor) -> torch.Tensor:
    if kernels.triton_ready(q):
        return _triton_rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter)
    d = keys.shape[-1]
    slot = length.reshape(1)
    keys.index_copy_(2, slot, _rotate(_heads(k, d), cos, sin).to(keys.dtype))
    values.index_copy_(2, slot, _heads(v, d).to(values.dtype))
    length.add_(1)
    return _rotate(_heads(q, d), cos, sin).contiguous()


@_rotary_cache_write.register_fake
def _(q, k, v, cos, sin, keys, values, length, counter):
    d = keys.shape[-1]
    return q.new_empty(q.shape[0], q.shape[-1] // d, 1, d)


def rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter) -> torch.Tensor:
    """See the module docstring. q [B, 1, Hq * D], k and v [B, 1, Hkv * D] (last dim contiguous),
    cos and sin [B, 1, R], keys and values [B, Hkv, L, D], length a scalar int64 tensor, counter
    an int32 [1] of zeros the kernel uses (and leaves zero) to advance length after every read."""
    cos, sin = cos.reshape(cos.shape[0], 1, -1).contiguous(), sin.reshape(sin.shape[0], 1, -1).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter)


@torch.library.custom_op("medmoe::rotary_cache_write_rows", mutates_args=("keys", "values"))
def _rotary_cache_write_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if kernels.triton_ready(q):
        return _triton_rotary_cache_write(q, k, v, cos, sin, keys, values, positions, None)
    d = keys.shape[-1]
    rows = torch.arange(q.shape[0], device=q.device)
    keys[rows, :, positions] = _rotate(_heads(k, d), cos, sin)[:, :, 0].to(keys.dtype)
    values[rows, :, positions] = _heads(v, d)[:, :, 0].to(values.dtype)
    return _rotate(_heads(q, d), cos, sin).contiguous()


@_rotary_cache_write_rows.register_fake
def _(q, k, v, cos, sin, keys, values, positions):
    d = keys.shape[-1]
    return q.new_empty(q.shape[0], q.shape[-1] // d, 1, d)


def rotary_cache_write_rows(q, k, v, cos, sin, keys, values, positions) -> torch.Tensor:
    """`rotary_cache_write` with a position per row: row b's key and value land at slot
    positions[b] of keys/values [S, Hkv, L, D] (S >= B rows, the last two dims contiguous, e.g. a
    slot-cache layer); positions is an int64 [B] on the device, read, not advanced."""
    cos, sin = cos.reshape(cos.shape[0], 1, -1).contiguous(), sin.reshape(sin.shape[0], 1, -1).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _rotary_cache_write_rows(q, k, v, cos, sin, keys, values, positions.contiguous())


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_cache_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, out_ptr, len_ptr, count_ptr,
                                  q_stride, k_stride, v_stride, row_stride, head_stride, kv_heads, programs,
                                  D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, PER_ROW: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        if PER_ROW:
            slot = tl.load(len_ptr + b)
        else:
            slot = tl.load(len_ptr)
        d = tl.arange(0, BLOCK_D)
        in_head = d < D
        in_rot = d < R
        partner = tl.where(d < R // 2, d + R // 2, d - R // 2)  # rotate_half: (-x2, x1)
        sign = tl.where(d < R // 2, -1.0, 1.0)
        c = tl.load(cos_ptr + b * R + d, mask=in_rot, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + b * R + d, mask=in_rot, other=0.0).to(tl.float32)
        q_row = q_ptr + b * q_stride + h * D
        x = tl.load(q_row + d, mask=in_head, other=0.0).to(tl.float32)
        xp = tl.load(q_row + partner, mask=in_rot, other=0.0).to(tl.float32)
        tl.store(out_ptr + (b * tl.num_programs(1) + h) * D + d, (x * c + sign * xp * s).to(out_ptr.dtype.element_ty),
                 mask=in_head)
        if h < kv_heads:
            cache_at = b * row_stride + h * head_stride + slot * D + d
            k_row = k_ptr + b * k_stride + h * D
            x = tl.load(k_row + d, mask=in_head, other=0.0).to(tl.float32)
            xp = tl.load(k_row + partner, mask=in_rot, other=0.0).to(tl.float32)
            tl.store(keys_ptr + cache_at, (x * c + sign * xp * s).to(keys_ptr.dtype.element_ty), mask=in_head)
            v_row = v_ptr + b * v_stride + h * D
            tl.store(values_ptr + cache_at, tl.load(v_row + d, mask=in_head, other=0.0).to(values_ptr.dtype.element_ty),
                     mask=in_head)
        if not PER_ROW:
            # The last program to finish advances the length: every program read it before its ticket.
            ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
            if ticket == programs - 1:
                tl.store(len_ptr, slot + 1)
                tl.store(count_ptr, 0)

    return triton, rotary_cache_write_kernel


def _triton_rotary_cache_write(q, k, v, cos, sin, keys, values, length, counter):
    """One program per row and head; `counter` None: `length` holds a position per row."""
    triton, kernel = _kernel()
    _, kv_heads, _, d = keys.shape
    b, heads = q.shape[0], q.shape[-1] // d
    if keys.stride() != values.stride() or keys.stride(-1) != 1 or keys.stride(-2) != d:
        raise ValueError(f"keys and values need the same strides, the last two dims contiguous: {keys.stride()}, "
                         f"{values.stride()}")
    out = q.new_empty(b, heads, 1, d)
    per_row = counter is None
    kernel[(b, heads)](q, k, v, cos, sin, keys, values, out, length, length if per_row else counter,
                       q.stride(0), k.stride(0), v.stride(0), keys.stride(0), keys.stride(1), kv_heads, b * heads,
                       D=d, R=cos.shape[-1], BLOCK_D=triton.next_power_of_2(d), PER_ROW=per_row, num_warps=1)
    return out


def _static_layer(cache, layer_idx: int):
    """The layer's transformers StaticLayer, once its tensors exist; else None."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not StaticLayer or not getattr(layer, "is_initialized", False):  # not a sliding-window one
        return None
    length = getattr(layer, "cumulative_length", None)
    return layer if isinstance(length, torch.Tensor) and length.dim() == 0 else None


def _slot_layer(cache, layer_idx: int, rows: int):
    """The layer of the engine's slot cache when this step feeds one token to each of its rows; else None."""
    if not isinstance(cache, SlotCache) or cache.kv is None or cache.write_at is None or cache.rows != rows:
        return None
    return cache.layers[layer_idx]


def one_token_layer(cache, layer_idx: int, hidden_states: torch.Tensor, head_dim: int):
    """The cache layer that `one_token_inputs` writes into, when `hidden_states` [B, T, ...] is one
    token per row (T == 1) and the cache is a static one or the engine's slot cache with heads of
    `head_dim`; else None: the attention runs its own path."""
    if hidden_states.shape[1] != 1:
        return None
    layer = _slot_layer(cache, layer_idx, hidden_states.shape[0])
    layer = layer if layer is not None else _static_layer(cache, layer_idx)
    return layer if layer is not None and layer.keys.shape[-1] == head_dim else None


def one_token_inputs(layer, q, k, v, position_embeddings, counter: torch.Tensor):
    """(query, keys, values) for the attention function after this step's rotary embedding and
    cache write, in one op: `rotary_cache_write_rows` on a slot-cache layer (each row at its own
    position; keys and values over the step's rows and span), else `rotary_cache_write` on a static
    layer (`counter`: a zero int32 [1] of the caller's). q, k, v [B, 1, heads * head_dim]."""
    cos, sin = position_embeddings
    if isinstance(layer, SlotLayer):
        query = rotary_cache_write_rows(q, k, v, cos, sin, layer.keys, layer.values, layer.cache.write_at)
        n, span = layer.cache.rows, layer.cache.span
        return query, layer.keys[:n, :, :span], layer.values[:n, :, :span]
    query = rotary_cache_write(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, counter)
    return query, layer.keys, layer.values


def _attention_function(config):
    impl = config._attn_implementation
    return eager_attention_forward if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


class PhiDecodeAttention(nn.Module):
    """Stands in for a PhiAttention (`attn`, its weights and settings) whose projections are not
    fused (engine/fused_layers.py's modules call the op themselves): its one-token step with a
    static cache runs `rotary_cache_write`, with the engine's slot cache `rotary_cache_write_rows`,
    every other call the attention's own forward."""

    inference_only = True

    def __init__(self, attn: PhiAttention):
        super().__init__()
        self.attn = attn
        device = next(attn.parameters()).device
        self.register_buffer("decode_counter", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        attn = self.attn
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name since transformers 5.24, and before
        layer = one_token_layer(cache, attn.layer_idx, hidden_states, attn.head_dim)
        if layer is None or args or position_embeddings is None or attn.training or attn.qk_layernorm:
            return attn(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
        query, keys, values = one_token_inputs(layer, q, k, v, position_embeddings, self.decode_counter)
        rest = {name: value for name, value in kwargs.items() if name not in ("cache", "past_key_values")}
        out, weights = _attention_function(attn.config)(attn, query, keys, values, attention_mask,
                                                        dropout=0.0, scaling=attn.scaling, **rest)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return attn.dense(out), weights


def _replace_children(model: nn.Module, replace) -> int:
    """Every child c of a module in `model` for which replace(c) is not None becomes replace(c)."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = replace(child)
            if new is not None:
                setattr(module, name, new)
                count += 1
    return count


def install(model: nn.Module) -> int:
    """Every transformers PhiAttention in `model` runs inside a PhiDecodeAttention; returns how many."""
    return _replace_children(model, lambda m: PhiDecodeAttention(m) if type(m) is PhiAttention else None)


def uninstall(model: nn.Module) -> int:
    """Undo `install`."""
    return _replace_children(model, lambda m: m.attn if type(m) is PhiDecodeAttention else None)


def count_installed(model: nn.Module) -> int:
    return sum(type(m) is PhiDecodeAttention for m in model.modules())
