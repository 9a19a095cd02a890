"""Glue for callers that think in batches: one engine per loaded model, and results laid out as
the reference loop's GenerationOutput (left-padded prompts and routing records), which routing
summaries and evaluation read."""

from __future__ import annotations

import weakref

import torch

from ..generation.generate import GenerationOutput
from ..moe import LayerRouting
from .request import Result
from .scheduler import Engine

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def shared_engine(model, processor, **options) -> Engine:
    """The engine of `model` (made on first use; one per model, so its CUDA graphs are reused).
    `options` (Engine's) apply when it is made, or make a new one when they differ."""
    engine, made_with = _ENGINES.get(model, (None, None))
    if engine is None or engine.processor is not processor or (options and options != made_with):
        engine = Engine(model, processor, **options)
        _ENGINES[model] = (engine, options)
    return engine


def as_generation_output(results: list[Result], pad_id: int = 0) -> GenerationOutput:
    width = max(r.prompt_tokens for r in results)
    ids = torch.full((len(results), width), pad_id, dtype=torch.long)
    for row, r in enumerate(results):
        ids[row, width - r.prompt_tokens:] = torch.tensor(r.prompt_ids, dtype=torch.long)
    routing = None
    if results and all(r.prompt_routing for r in results):
        routing = [_pad_layer([r.prompt_routing[i] for r in results], width)
                   for i in range(len(results[0].prompt_routing))]
    return GenerationOutput([r.text for r in results], [r.token_ids for r in results], ids, routing,
                            [r.finish_reason for r in results])


def _pad_layer(records: list[LayerRouting], width: int) -> LayerRouting:
    def pad(parts: list[torch.Tensor]) -> torch.Tensor:
        out = parts[0].new_zeros(len(parts), width, parts[0].shape[-1])
        for row, part in enumerate(parts):
            out[row, width - part.shape[1]:] = part[0]
        return out

    return LayerRouting(records[0].layer, pad([r.expert_index for r in records]), pad([r.probs for r in records]))
