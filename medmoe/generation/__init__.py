"""Generation: answers from a model, batched or streamed."""

from .generate import GenerationOutput, SamplingConfig, generate, run_generation, stream

__all__ = ["GenerationOutput", "SamplingConfig", "generate", "run_generation", "stream"]
