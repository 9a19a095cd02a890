"""Fast generation: a static KV cache and the one-token decode step replayed as a CUDA graph.

Plain `generate` spends most of a small-batch decode step launching kernels from Python (about
25x the memory floor for a Phi-2-size model). Here every buffer the step touches has a fixed
address, so the step is captured once per call and replayed: the token, its position, the cache
write index and the attention bias live on the device and are advanced inside the graph. The
MoE blocks sync with the host nowhere (see moe/dispatch.py); the loop reads the device only every
`check_every` tokens, to stop early once every sequence has ended.

    tokens = decode(model, input_ids, attention_mask, pixel_values, max_new_tokens=64)
    texts = generate_fast(model, processor, ["What modality is this?"], [image])

On the CPU (or with cuda_graph=False) the same static-cache step runs eagerly.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from transformers import StaticCache

from ..model.modeling import cache_argument
from ..generation.generate import eos_ids


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Greedy, or a sample at `temperature` by the Gumbel-max trick (graph-safe: no multinomial)."""
    if temperature <= 0:
        return logits.argmax(-1)
    gumbel = -torch.empty_like(logits).exponential_().log()
    return (logits / temperature + gumbel).argmax(-1)


CACHE_BUCKET = 256


def _step(lm, cache_name: str, cache, token, bias, position, write_index, temperature: float) -> None:
    """One decode step on fixed buffers: unmask the new slot, run the model, advance token and position."""
    bias.index_fill_(-1, write_index, 0.0)
    logits = lm(inputs_embeds=lm.get_input_embeddings()(token), attention_mask=bias, position_ids=position,
                use_cache=True, **{cache_name: cache}).logits
    token.copy_(_pick(logits[:, -1].float(), temperature).unsqueeze(-1))
    position.add_(1)
    write_index.add_(1)


_COMPILED = {}


def compiled_step(mode: str | None = None):
    """The step through torch.compile, once per process and `mode` (None: the default; our own CUDA
    graph captures the step, so a mode must leave inductor's off: "max-autotune-no-cudagraphs")."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_step, dynamic=False, mode=mode)
    return _COMPILED[mode]


class _DecodeState:
    """The fixed-address buffers one decode step reads and advances."""

    def __init__(self, prompt_mask: torch.Tensor, max_len: int, dtype: torch.dtype):
        b, p = prompt_mask.shape
        device = prompt_mask.device
        self.min = torch.finfo(dtype).min
        self.bias = torch.full((b, 1, 1, max_len), self.min, dtype=dtype, device=device)  # additive mask
        self.bias[:, 0, 0, :p].masked_fill_(prompt_mask.bool(), 0.0)
        self.position = prompt_mask.long().sum(-1, keepdim=True)  # [B, 1] of the token being fed
        self.write_index = torch.full((1,), p, dtype=torch.long, device=device)  # cache slot it lands in
        self.token = torch.zeros(b, 1, dtype=torch.long, device=device)


def _prefill_bias(prompt_mask: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, P, max_len] additive mask: causal over the prompt, pads hidden, later slots hidden."""
    b, p = prompt_mask.shape
    slots = torch.arange(max_len, device=prompt_mask.device)
    causal = slots[None, :] <= torch.arange(p, device=prompt_mask.device)[:, None]
    keep = torch.zeros(b, max_len, dtype=torch.bool, device=prompt_mask.device)
    keep[:, :p] = prompt_mask.bool()
    attend = causal[None] & keep[:, None, :]
    bias = torch.zeros(b, 1, p, max_len, dtype=dtype, device=prompt_mask.device)
    return bias.masked_fill_(~attend[:, None], torch.finfo(dtype).min)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           pixel_values: torch.Tensor | None = None, max_new_tokens: int = 64,
           eos_token_id: int | Iterable[int] | None = None,
           temperature: float = 0.0, cuda_graph: bool | None = None, check_every: int = 16,
           compile: bool | str = False, stats: dict | None = None) -> torch.Tensor:
    """New tokens [B, max_new_tokens] for a left-padded batch. `eos_token_id`: one id or several
    (any of them ends a sequence); after a sequence's end, its end token repeats.

    `stats`, when given, receives prefill_ms, capture_ms and step_ms (the mean time of the steps
    after capture); timing it adds host syncs, so leave it None outside benchmarks.
    `compile=True` also fuses the step's small kernels with torch.compile (compiled once per batch
    size and cache bucket; the first call takes a minute or more); a string is torch.compile's
    `mode` (compiled_step).
    """
    clock = _Clock(stats)
    lm = model.language_model
    device = lm.get_input_embeddings().weight.device
    dtype = lm.get_input_embeddings().weight.dtype
    input_ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device)
    batch, prompt_len = input_ids.shape
    # Cache lengths in buckets, so that a compiled step is reused across prompts of similar length.
    max_len = -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and graph_safe(model, dtype, device)
    cache = StaticCache(config=lm.config, max_cache_len=max_len)
    state = _DecodeState(mask, max_len, dtype)

    # Prefill (eager): the whole prompt, image tokens spliced in, into the static cache.
    embeds = model.embed_inputs(input_ids, pixel_values)
    model.moe_state.start(mask, False, True)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    model.route_by_prompt(embeds, mask, mask, positions)
    cache_name = cache_argument(lm)
    out = lm(inputs_embeds=embeds, attention_mask=_prefill_bias(mask, max_len, dtype), position_ids=positions,
             use_cache=True, logits_to_keep=1, **{cache_name: cache})
    state.token.copy_(_pick(out.logits[:, -1].float(), temperature).unsqueeze(-1))
    model.moe_state.start(None, False, False)
    clock.mark(device, "prefill_ms")

    step_fn = compiled_step(compile if isinstance(compile, str) else None) if compile else _step

    def step() -> None:
        step_fn(lm, cache_name, cache, state.token, state.bias, state.position, state.write_index, temperature)

    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else sorted(eos_token_id), dtype=torch.long, device=device)
    tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    tokens[:, 0] = state.token[:, 0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    graph = None
    steps_timed = 0
    for i in range(1, max_new_tokens):
        if eos is not None:
            finished |= torch.isin(tokens[:, i - 1], eos)
            if i % check_every == 0 and bool(finished.all()):
                tokens[:, i:] = -1  # filled below with each row's end token
                break
        if graph is not None:
            graph.replay()
            steps_timed += 1
        elif cuda_graph and i >= 3:  # two eager steps warm up kernels and allocator first
            clock.mark(device, "warmup_ms")
            graph = _capture(step)
            clock.mark(device, "capture_ms")
            graph.replay()
            steps_timed = 1
        else:
            step()
            steps_timed += 1
        tokens[:, i] = state.token[:, 0]
    clock.mark(device, "steps_ms")
    if stats is not None:
        stats["step_ms"] = stats["steps_ms"] / max(steps_timed, 1)
        stats["steps"] = steps_timed
        stats["cuda_graph"] = graph is not None
    if eos is not None:
        is_end = torch.isin(tokens, eos)
        ended = is_end.long().cumsum(-1) > 0
        first_end = is_end.long().argmax(-1, keepdim=True)  # the token that ended each row
        tokens = torch.where(ended, tokens.gather(1, first_end).expand_as(tokens), tokens)
    return tokens


class _Clock:
    """Wall-clock marks (after a device sync) into `stats`; does nothing when stats is None."""

    def __init__(self, stats: dict | None):
        self.stats, self.last = stats, time.perf_counter()

    def mark(self, device: torch.device, name: str) -> None:
        if self.stats is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.stats[name] = (now - self.last) * 1e3
        self.last = now


def graph_safe(model, dtype: torch.dtype, device: torch.device) -> bool:
    """True when every MoE block runs without host syncs (the loop sizes groups on the host):
    stacked experts on the grouped path, or LoRA experts fused with their meta expert."""
    from ..moe import LoRAExperts, StackedExperts, dispatch

    probe = torch.empty(1, 1, dtype=dtype, device=device)

    def sync_free(block) -> bool:
        if isinstance(block.experts, LoRAExperts):
            return block.meta is block.experts.shared and block.experts.fuse_with_shared
        return (isinstance(block.experts, StackedExperts) and block.experts.dispatch_mode != "loop"
                and dispatch.grouped_supported(probe, block.experts))

    return all(sync_free(b) for b in model.moe_blocks)


def _capture(step) -> torch.cuda.CUDAGraph:
    """Capture one decode step. Capturing records kernels without running them, so state is untouched."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def generate_fast(model, processor, questions: list[str], images: list | None = None, max_new_tokens: int = 64,
                  temperature: float = 0.0, cuda_graph: bool | None = None) -> list[str]:
    """Answers for a batch of questions (with optional images), by `decode`; an answer ends at any
    special token, as in `generate`."""
    batch = processor(questions, images, padding_side="left")
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.language_model.get_input_embeddings().weight.dtype)
    eos = eos_ids(model, processor)
    tokens = decode(model, batch["input_ids"], batch["attention_mask"], pixel_values, max_new_tokens, eos,
                    temperature, cuda_graph)
    texts = []
    for row in tokens.tolist():
        end = next((j for j, token in enumerate(row) if token in eos), len(row))
        texts.append(processor.decode(row[:end]))
    return texts
