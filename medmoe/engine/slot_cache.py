"""The engine's KV cache: one preallocated row ("slot") per running request, each with its own length.

All layers' keys and values live in one tensor [2, layers, slots + staging, kv_heads, capacity,
head_dim], so that moving a request from one slot to another, or loading a prefilled prompt into a
slot, is one copy. The `staging` slots after the decode slots hold prompts being prefilled in place
(prefill_step.py: `PrefillView` writes each row's tokens at their own positions there); decode
steps never touch them. A decode step runs on the first `rows` slots (the engine keeps its running requests in slots
0..n-1) and attends over the first `span` positions: every layer writes the new token's key and
value at its row's own position (`write_at`, one per row) and returns views of the buffer, so a
step has fixed addresses for a CUDA graph. The capacity grows in buckets (up to `max_len`) as
longer requests arrive; growing reallocates, so the engine drops its captured graphs then.

    cache = SlotCache(lm.config, slots=8, max_len=2048, dtype=..., device=...)
    cache.reserve(640)                         # capacity for prompts + answers of 640 tokens
    cache.load(slot, keys, values)             # a prefilled prompt into a slot
    cache.rows, cache.span, cache.write_at = n, span, positions[:n]
    lm(..., cache=cache)                       # one token per row
    lm(..., cache=PrefillView(cache, staged_slots, positions))   # several tokens per row, into staging slots
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

BUCKET = 256  # the capacity grows in steps of this many tokens


def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers LM config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in a slot cache of a language model with `config`."""
    return kv_bytes_per_token_of(*_kv_shape(config), dtype)


def kv_bytes_per_token_of(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotLayer(CacheLayerMixin):
    """One layer's view of the slot buffer: writes each row's token at the row's own position."""

    is_compileable = True

    def __init__(self, cache: "SlotCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffer exists from the start
        pass

    @property
    def keys(self):
        return self.cache.kv[0, self.index] if self.cache.kv is not None else None

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self):
        return self.cache.kv[1, self.index] if self.cache.kv is not None else None

    @values.setter
    def values(self, value):
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self.cache
        n, span = cache.rows, cache.span
        if key_states.shape[0] != n or key_states.shape[2] != 1:
            raise RuntimeError(f"the slot cache takes one token for each of its {n} rows, got {tuple(key_states.shape)}")
        keys, values = cache.kv[0, self.index], cache.kv[1, self.index]
        rows = cache.row_index[:n]
        keys[rows, :, cache.write_at] = key_states[:, :, 0].to(keys.dtype)
        values[rows, :, cache.write_at] = value_states[:, :, 0].to(values.dtype)
        return keys[:n, :, :span], values[:n, :, :span]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.span, 0

    def get_seq_length(self) -> int:
        return self.cache.longest

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 staging: int = 0):
        self.num_layers, self.kv_heads, self.head_dim = _kv_shape(config)
        super().__init__(layers=[SlotLayer(self, i) for i in range(self.num_layers)])
        self.slots, self.max_len, self.staging = slots, max_len, staging
        self.dtype, self.device = dtype, torch.device(device)
        self.kv: torch.Tensor | None = None
        self.capacity = 0
        self.version = 0  # bumped when the buffer is reallocated (captured graphs hold its address)
        self.row_index = torch.arange(slots, device=self.device)
        self.rows, self.span, self.longest = 0, 0, 0
        self.write_at: torch.Tensor | None = None

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token_of(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    def nbytes(self) -> int:
        """Bytes of the buffer now."""
        return (self.slots + self.staging) * self.capacity * self.bytes_per_token()

    def reserve(self, length: int) -> None:
        """Capacity for `length` tokens per slot (a multiple of BUCKET, at most max_len)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"{length} tokens do not fit a slot of {self.max_len}")
        capacity = min(-(-length // BUCKET) * BUCKET, self.max_len)
        kv = torch.zeros(2, self.num_layers, self.slots + self.staging, self.kv_heads, capacity, self.head_dim,
                         dtype=self.dtype, device=self.device)
        if self.kv is not None:
            kv[..., : self.capacity, :].copy_(self.kv)
        self.kv, self.capacity = kv, capacity
        self.version += 1

    def release(self) -> None:
        """Free the buffer (no request holds a slot); the next `reserve` allocates it again."""
        if self.kv is not None:
            self.kv, self.capacity = None, 0
            self.version += 1

    def load(self, slot: int, keys: torch.Tensor, values: torch.Tensor, at: int = 0) -> None:
        """Prefilled keys/values [layers, kv_heads, n, head_dim] into positions at..at+n of `slot`."""
        n = keys.shape[-2]
        self.kv[0, :, slot, :, at:at + n].copy_(keys)
        self.kv[1, :, slot, :, at:at + n].copy_(values)

    def move(self, source: int, target: int, length: int) -> None:
        """The first `length` positions of slot `source` into slot `target`."""
        self.kv[:, :, target, :, :length].copy_(self.kv[:, :, source, :, :length])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.longest


class PrefillLayer(CacheLayerMixin):
    """One layer's view of the staging slots for a prefill forward: row r's tokens land in slot
    `slots[r]` at `positions[r]`; attention reads those slots' first `span` positions."""

    is_compileable = True

    def __init__(self, view: "PrefillView", index: int):
        super().__init__()
        self.view, self.index = view, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        view = self.view
        kv = view.cache.kv
        slots, positions = view.slots, view.positions
        if key_states.shape[:1] + key_states.shape[2:3] != positions.shape:
            raise RuntimeError(f"a prefill view of {tuple(positions.shape)} (rows, tokens) got keys of "
                               f"{tuple(key_states.shape)}")
        keys, values = kv[0, self.index], kv[1, self.index]  # [all slots, kv heads, capacity, head dim]
        # Advanced indices on dims 0 and 2 put (rows, tokens) first: [rows, tokens, kv heads, head dim].
        keys[slots[:, None], :, positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[slots[:, None], :, positions] = value_states.transpose(1, 2).to(values.dtype)
        span = view.span
        return keys[:, :, :span].index_select(0, slots), values[:, :, :span].index_select(0, slots)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.view.span, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.view.cache.capacity


class PrefillView(Cache):
    """The slot cache as a prefill forward sees it: `slots` [rows] (staging slots), `positions`
    [rows, tokens] where each token's key and value go (a padding token at the last position of
    the capacity, which no prompt token has: the slot's owner writes it before it reads it), and
    the `span` of positions attention reads."""

    def __init__(self, cache: SlotCache, slots: torch.Tensor, positions: torch.Tensor, span: int):
        self.cache, self.slots, self.positions, self.span = cache, slots, positions, span
        super().__init__(layers=[PrefillLayer(self, i) for i in range(cache.num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
