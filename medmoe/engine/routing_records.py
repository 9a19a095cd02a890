"""A request's prompt routing records inside the engine: every MoE layer's choices stacked into two
host tensors, so that the per-request bookkeeping (joining a cached prefix's records to the new
tokens', keeping them in the prefix cache, handing them out) costs two tensor operations, not two
per layer, and no device kernels. Requests get them as the model's per-layer `LayerRouting` records
([1, tokens, ...] each, `as_layers`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moe import LayerRouting


@dataclass
class Records:
    layers: tuple[int, ...]
    expert_index: torch.Tensor  # [layers, tokens, k]
    probs: torch.Tensor  # [layers, tokens, experts]

    def __len__(self) -> int:
        return self.expert_index.shape[1]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.expert_index, self.probs))

    def view(self, start: int, end: int | None = None) -> "Records":
        return Records(self.layers, self.expert_index[:, start:end], self.probs[:, start:end])

    def slice(self, start: int, end: int | None = None) -> "Records":
        """Tokens start..end, copied (a view would keep the whole of a longer prompt's records alive)."""
        return Records(self.layers, self.expert_index[:, start:end].clone(), self.probs[:, start:end].clone())

    def as_layers(self) -> list[LayerRouting]:
        return [LayerRouting(layer, self.expert_index[i][None], self.probs[i][None]) for i, layer in enumerate(self.layers)]


def forward_records(routing: list[LayerRouting] | None) -> Records | None:
    """A forward's records for all its rows, [layers, rows, tokens, ...], on the host in one copy each;
    `row_records` takes a row's tokens out of it."""
    if not routing:
        return None
    index = torch.stack([r.expert_index for r in routing]).to("cpu")
    probs = torch.stack([r.probs for r in routing]).to("cpu")
    return Records(tuple(r.layer for r in routing), index, probs)


def row_records(batch: Records | None, row: int, start: int, end: int | None = None) -> Records | None:
    if batch is None:
        return None
    return Records(batch.layers, batch.expert_index[:, row, start:end], batch.probs[:, row, start:end])


def join(parts: list[Records]) -> Records:
    if len(parts) == 1:
        return parts[0]
    return Records(parts[0].layers, torch.cat([p.expert_index for p in parts], 1), torch.cat([p.probs for p in parts], 1))


def join_records(head: Records | None, tail: Records | None) -> Records | None:
    """The records of a prompt's first tokens followed by those of its next ones (None: not all known)."""
    if tail is None or head is None:
        return tail if head is None else None
    return join([head, tail])
