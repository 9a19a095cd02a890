"""The inference engine: what makes a loaded model generate fast, applied through seams the core
declares, and the one object every user path (`serve`, `ask`, `chat`, `eval`, the Python API,
`bench`) generates through, with continuous batching:

    from medmoe.engine import Engine, Request, encode_question
    engine = Engine(model, processor, max_slots=16)
    results = engine.generate([Request(encode_question(processor, "What is shown?", image))])

scheduler.py (the engine), slot_cache.py (its KV cache), prefix_cache.py (prompt prefixes kept
across requests), decode_step.py (the batched step, CUDA graphs), prefill_step.py (prefill into the cache, CUDA graphs on a
GPU), sampling.py (per-request
sampling, log-probabilities), request.py (what goes in and out), stats.py (what the engine did,
where its time went), batch.py (one engine per model;
results as the reference's output); the speed-ups the model takes for inference: fused_layers.py,
overlap.py, decode_attention.py; static_decode.py (one batch of equal settings, static cache). The
plain loop of generation/generate.py is the reference the engine is tested against.

The names below load on first use: the model and MoE layers import this package's speed-ups, so
importing the scheduler here (which imports the model) would close a loop.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Delta": "request", "Handle": "request", "Prompt": "request", "Request": "request", "Result": "request",
    "TokenLogprob": "request", "encode_conversation": "request", "encode_question": "request",
    "Engine": "scheduler", "EngineBusy": "scheduler", "RequestTooLong": "scheduler",
    "as_generation_output": "batch", "shared_engine": "batch", "EngineStats": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
