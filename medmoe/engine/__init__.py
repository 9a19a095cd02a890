"""The inference engine: one object that takes a loaded model and generates, with continuous
batching, for every user path (`serve`, `ask`, `chat`, `eval`, the Python API, `bench`).

    from medmoe.engine import Engine, Request, encode_question
    engine = Engine(model, processor, max_slots=16)
    results = engine.generate([Request(encode_question(processor, "What is shown?", image))])

scheduler.py (the engine), slot_cache.py (the KV cache), decode_step.py (the batched step, CUDA
graphs), sampling.py (per-request sampling, log-probabilities), request.py (what goes in and out).
The plain loop of generation/generate.py is the reference the engine is tested against.
"""

from .request import Delta, Handle, Prompt, Request, Result, TokenLogprob, encode_conversation, encode_question
from .scheduler import Engine, EngineBusy, RequestTooLong
from .batch import as_generation_output, shared_engine

__all__ = ["Delta", "Engine", "EngineBusy", "Handle", "Prompt", "Request", "RequestTooLong", "Result", "TokenLogprob",
           "as_generation_output", "encode_conversation", "encode_question", "shared_engine"]
