"""An FFN's activation output, recomputed in backward instead of kept (activation recomputation).

The second projection of an FFN keeps its input, the activation's output act(h) [tokens, ffn],
for its weight gradient: the widest tensor of a layer. The activation's own backward keeps h
anyway, so inside `recomputed_in_backward(g, lambda: act(h))` autograd keeps nothing for g and
backward recomputes act(h) when it needs it: one elementwise kernel per FFN more, and no Python per
op (torch.utils.checkpoint's selective mode runs a dispatch mode over every op of a layer, which
leaves the GPU waiting for the host).

    g = act(h)
    with recomputed_in_backward(g, lambda: act(h)):
        y = g @ w_out
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


class _Recompute:
    """What autograd keeps in place of a tensor: how to rebuild it, and which view of it was saved."""

    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn: Callable[[], torch.Tensor], saved: torch.Tensor):
        self.fn, self.size, self.stride, self.offset = fn, saved.size(), saved.stride(), saved.storage_offset()

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn().as_strided(self.size, self.stride, self.offset)


@contextlib.contextmanager
def recomputed_in_backward(output: torch.Tensor, recompute: Callable[[], torch.Tensor], enabled: bool = True):
    """Within the block, autograd does not keep `output` (nor any view of it) for backward;
    `recompute()` rebuilds it, bit for bit, when backward needs it. `recompute()` must return a
    tensor laid out as `output` is (contiguous), and must only read tensors that stay unchanged
    until backward."""
    if not (enabled and torch.is_grad_enabled() and output.is_contiguous() and output.storage_offset() == 0):
        yield
        return
    storage = output.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        return _Recompute(recompute, t) if t.untyped_storage().data_ptr() == storage else t

    def unpack(saved):
        return saved.rebuild() if isinstance(saved, _Recompute) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
