"""A request's prompt routing records inside the engine: every MoE layer's choices stacked into two
host tensors, so that the per-request bookkeeping (joining a cached prefix's records to the new
tokens', keeping them in the prefix cache, handing them out) costs two tensor operations, not two
per layer, and no device kernels. Requests get them as the model's per-layer `LayerRouting` records
([1, tokens, ...] each, `as_layers`).

On a GPU a forward's records travel to the host in stream order (pinned memory, no wait), and
joining records whose copy may still run is deferred: nothing here waits for the device until the
tensors are read (`expert_index`, `probs`, `slice`, `as_layers`), so that making a request's
records never holds the host back from launching the next step."""

from __future__ import annotations

import torch

from ..moe import LayerRouting


class Records:
    """Records of `len(self)` tokens: `expert_index` [layers, tokens, k], `probs` [layers, tokens,
    experts], on the host. `ready`: the copy from the device still in flight; `parts`: records to
    be joined at the first read."""

    __slots__ = ("layers", "_index", "_probs", "ready", "parts")

    def __init__(self, layers: tuple[int, ...], expert_index: torch.Tensor | None = None,
                 probs: torch.Tensor | None = None, ready: torch.cuda.Event | None = None,
                 parts: list["Records"] | None = None):
        self.layers, self._index, self._probs, self.ready, self.parts = layers, expert_index, probs, ready, parts

    def _resolve(self) -> None:
        if self.parts is not None:
            parts, self.parts = self.parts, None
            for part in parts:
                part._resolve()
            self._index = torch.cat([p._index for p in parts], 1)
            self._probs = torch.cat([p._probs for p in parts], 1)
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    @property
    def expert_index(self) -> torch.Tensor:
        self._resolve()
        return self._index

    @property
    def probs(self) -> torch.Tensor:
        self._resolve()
        return self._probs

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts) if self.parts is not None else self._index.shape[1]

    @property
    def bytes(self) -> int:
        if self.parts is not None:
            return sum(p.bytes for p in self.parts)
        return sum(t.numel() * t.element_size() for t in (self._index, self._probs))

    def view(self, start: int, end: int | None = None) -> "Records":
        if self.parts is not None:
            self._resolve()
        return Records(self.layers, self._index[:, start:end], self._probs[:, start:end], self.ready)

    def slice(self, start: int, end: int | None = None) -> "Records":
        """Tokens start..end, copied (a view would keep the whole of a longer prompt's records alive)."""
        return Records(self.layers, self.expert_index[:, start:end].clone(), self.probs[:, start:end].clone())

    def as_layers(self) -> list[LayerRouting]:
        index, probs = self.expert_index, self.probs
        return [LayerRouting(layer, index[i][None], probs[i][None]) for i, layer in enumerate(self.layers)]


def forward_records(routing: list[LayerRouting] | None) -> Records | None:
    """A forward's records for all its rows, [layers, rows, tokens, ...], on the host in one copy each
    (from a GPU without waiting for it); `row_records` takes a row's tokens out of it."""
    if not routing:
        return None
    index = torch.stack([r.expert_index for r in routing])
    probs = torch.stack([r.probs for r in routing])
    layers = tuple(r.layer for r in routing)
    if not index.is_cuda:
        return Records(layers, index.to("cpu"), probs.to("cpu"))
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in (index, probs)]
    ready = torch.cuda.Event()
    ready.record()
    return Records(layers, *host, ready)


def row_records(batch: Records | None, row: int, start: int, end: int | None = None) -> Records | None:
    if batch is None:
        return None
    return Records(batch.layers, batch._index[:, row, start:end], batch._probs[:, row, start:end], batch.ready)


def join(parts: list[Records]) -> Records:
    if len(parts) == 1:
        return parts[0]
    return Records(parts[0].layers, parts=list(parts))


def join_records(head: Records | None, tail: Records | None) -> Records | None:
    """The records of a prompt's first tokens followed by those of its next ones (None: not all known)."""
    if tail is None or head is None:
        return tail if head is None else None
    return join([head, tail])
