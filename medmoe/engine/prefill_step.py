"""A prefill forward written straight into the KV cache, captured as a CUDA graph per shape bucket.

On a GPU a prefill forward of a few prompts costs its kernel launches, not its arithmetic
(docs/lab/speed-history.md, runs O and 10). So prefill runs as the decode step does: from fixed
input buffers, at a few shapes, each replayed from a CUDA graph.

Each prompt being prefilled owns a staging slot of the slot cache (slot_cache.py) from admission
(its cached prefix copied in) to its last piece, after which its keys and values move to its decode
slot. A forward feeds row r its next n_r tokens, left-padded to Q tokens, at positions
done_r..done_r+n_r-1 of its staging slot; a padding token (and a padding row, pointed at the first
staging slot) writes at the capacity's last position, which no prompt token has and every owner
writes before it reads. Each token attends over the first S positions of its slot, masked to the
positions up to its own. The forward's shape is (rows, Q, S): rows round up to a power of two, Q
to a power of two of at least MIN_TOKENS, S (the furthest position a row reaches) to Q times a
power of four, at most the capacity. `warm_up` captures the buckets of up to twice the engine's
prefill budget, smallest first, each after one eager forward of its shape, for at most
WARMUP_SECONDS; a bucket it did not reach is captured when it first occurs twice.

A graph saves a forward's launches but computes its padding. Where the padded forward's arithmetic
is large (more than GRAPH_MAX_FLOPS, counting every language-model weight: two or more Phi-2-size
image prompts), the padding costs more than the launches save (docs/lab/speed-history.md, run P),
so the forward runs eagerly at its exact shape instead.

The MoE blocks record their routing in every forward (the records of the rows that want them are
copied to the host).

On the CPU (tests) the same path runs eagerly at the same bucketed shapes. The model's own forward
(scheduler.py: `_prefill_prompts`) stays the path for models that route per sample, where a
prompt's expert depends on all of its tokens, and the reference this one is tested against.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import is_out_of_memory
from ..model.attention_kernels import varying_shape_attention
from ..model.modeling import cache_argument
from .graph_capture import GraphRecorder
from .prefill_kernels import pow2_at_least
from .slot_cache import PrefillView, SlotCache
from .stats import EngineStats

MIN_TOKENS = 64  # the shortest token bucket: shorter pieces pad up to it
WARMUP_FORWARDS = 1  # eager forwards of a shape before its capture (kernel autotuning, cuBLAS handles)
WARMUP_SECONDS = 20.0  # the most `warm_up` spends capturing (a Phi-2-size model has about a hundred buckets)
GRAPH_MAX_FLOPS = 2e13  # 2 x language-model weights x padded tokens above which a forward runs eagerly, unpadded

logger = logging.getLogger(__name__)


class PrefillStep:
    def __init__(self, model, cache: SlotCache, cuda_graphs: bool, max_tokens: int, stats: EngineStats | None = None):
        """`max_tokens`: the most prompt tokens one forward takes (the engine's prefill budget); shapes
        of up to twice that (a power of two of rows times one of tokens) are captured, larger ones run eagerly."""
        self.model, self.cache = model, cache
        self.lm = model.language_model
        self.cache_name = cache_argument(self.lm)
        self.stats = stats if stats is not None else EngineStats()
        self.cuda_graphs = cuda_graphs
        self.limit = 2 * max_tokens  # rows x tokens of the largest shape captured
        device = cache.device
        self.hidden = self.lm.get_input_embeddings().weight.shape[1]
        # The graphs' inputs, flat, for shapes up to `limit` (a larger eager shape gets its own).
        self.embeds = torch.zeros(self.limit * self.hidden, device=device, dtype=cache.dtype)
        self.positions = torch.zeros(self.limit, device=device, dtype=torch.long)
        self.slots = torch.zeros(cache.staging, device=device, dtype=torch.long)
        self.min = torch.finfo(cache.dtype).min
        self.record = model.is_moe
        self.flops_per_token = 2 * sum(p.numel() for p in self.lm.parameters())
        self.graphs: dict[tuple[int, int, int], tuple] = {}
        self.warm: dict[tuple[int, int, int], int] = {}
        self.recorder = GraphRecorder()
        self.version = cache.version

    def shape(self, rows: int, tokens: int, end: int) -> tuple[int, int, int]:
        """The (rows, tokens, span) bucket of a forward of `rows` pieces of at most `tokens` tokens
        whose furthest token is at position end - 1."""
        capacity = self.cache.capacity
        q = min(pow2_at_least(tokens, MIN_TOKENS), capacity)
        span = q * 4 ** ((pow2_at_least(-(-end // q)).bit_length()) // 2)  # q times the next power of four
        return min(pow2_at_least(rows), self.cache.staging), q, min(span, capacity)

    def graphable(self, shape: tuple[int, int, int]) -> bool:
        """Whether a bucket runs from a CUDA graph (where graphs are on): its inputs fit the buffers
        and its padded arithmetic is at most GRAPH_MAX_FLOPS."""
        tokens = shape[0] * shape[1]
        return tokens <= self.limit and tokens * self.flops_per_token <= GRAPH_MAX_FLOPS

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every bucket `warm_up` captures: rows up to the staging slots, tokens and span up to the
        capacity, those `graphable`."""
        capacity = self.cache.capacity
        found = set()
        for rows in range(1, self.cache.staging + 1):
            for tokens in (MIN_TOKENS << k for k in range(capacity.bit_length())):
                for end in (tokens << k for k in range(capacity.bit_length())):
                    shape = self.shape(rows, min(tokens, capacity), min(end, capacity))
                    if self.graphable(shape):
                        found.add(shape)
        return sorted(found, key=lambda shape: (shape[0] * shape[1], shape[2]))

    def __call__(self, pieces: list[tuple[int, int, torch.Tensor]]):
        """Run one forward over `pieces`: (staging slot, position of the first token, embeddings [n, d]).
        Returns the last tokens' logits [len(pieces), V] (float) and the forward's routing records
        (per MoE layer, [rows, tokens, ...], the pieces right-aligned in the bucket's tokens) or None."""
        tokens, end = max(e.shape[0] for _, _, e in pieces), max(start + e.shape[0] for _, start, e in pieces)
        shape = self.shape(len(pieces), tokens, end)
        bucketed = self.graphable(shape)
        if not bucketed:  # arithmetic-bound: no padding, no graph
            shape = (len(pieces), tokens, end)
        inputs = self._fill(pieces, *shape)
        logits, routing = self._run(shape, inputs, capture=bucketed)
        return logits[:len(pieces)], routing

    def _inputs(self, rows: int, tokens: int):
        """(embeddings, positions, slots) of a forward: views of the graphs' buffers, or new tensors
        for a shape larger than they hold."""
        need, device = rows * tokens, self.cache.device
        if need > self.limit or rows > self.slots.numel():
            return (torch.zeros(rows, tokens, self.hidden, dtype=self.cache.dtype, device=device),
                    torch.zeros(rows, tokens, dtype=torch.long, device=device),
                    torch.zeros(rows, dtype=torch.long, device=device))
        return (self.embeds[:need * self.hidden].view(rows, tokens, self.hidden),
                self.positions[:need].view(rows, tokens), self.slots[:rows])

    def _fill(self, pieces, rows: int, tokens: int, span: int):
        cache = self.cache
        embeds, positions, slots = inputs = self._inputs(rows, tokens)
        host_positions = torch.full((rows, tokens), cache.capacity - 1, dtype=torch.long)
        host_slots = torch.full((rows,), cache.slots, dtype=torch.long)
        for row, (slot, start, piece) in enumerate(pieces):
            n = piece.shape[0]
            host_positions[row, tokens - n:] = torch.arange(start, start + n)
            host_slots[row] = slot
            embeds[row, tokens - n:].copy_(piece)
        non_blocking = cache.device.type == "cuda"
        positions.copy_(host_positions, non_blocking=non_blocking)
        slots.copy_(host_slots, non_blocking=non_blocking)
        return inputs

    def _forward(self, span: int, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):
        columns = torch.arange(span, device=positions.device)
        hidden = (columns[None, None, :] > positions[:, :, None])[:, None]  # [rows, 1, tokens, span]
        bias = torch.zeros(hidden.shape, dtype=self.cache.dtype, device=positions.device).masked_fill_(hidden, self.min)
        state = self.model.moe_state
        state.start(None, self.record, True)
        view = PrefillView(self.cache, slots, positions, span)
        out = self.lm(inputs_embeds=embeds, attention_mask=bias, position_ids=positions, use_cache=True,
                      logits_to_keep=1, **{self.cache_name: view})
        return out.logits[:, -1].float(), list(state.routing) if self.record else None

    def _run(self, shape: tuple[int, int, int], inputs, capture: bool = True):
        if self.version != self.cache.version:  # the buffer moved: the graphs point at the old one
            self._drop_graphs()
            self.version = self.cache.version
        if shape in self.graphs:
            graph, outputs = self.graphs[shape]
            graph.replay()
            self.stats.prefill_replays += 1
            return outputs
        with varying_shape_attention(self.cache.device):
            outputs = self._forward(shape[2], *inputs)
        if not (self.cuda_graphs and capture):
            return outputs
        self.warm[shape] = self.warm.get(shape, 0) + 1
        if self.warm[shape] > WARMUP_FORWARDS:
            self._try_capture(shape, inputs)
        return outputs

    def _try_capture(self, shape: tuple[int, int, int], inputs) -> None:
        start = time.perf_counter()
        try:
            self.graphs[shape] = self._capture(shape[2], inputs)
        except Exception as err:
            # Prefill still runs, eagerly. Out of memory is the caller's to handle.
            if is_out_of_memory(err):
                raise
            logger.warning("capturing a prefill forward's CUDA graph failed (%s: %s); prefilling without CUDA "
                           "graphs from now on (slower, the same tokens)", type(err).__name__, err)
            self.cuda_graphs = False
            self.stats.graph_fallbacks += 1
            self._drop_graphs()
            return
        self.stats.prefill_captures += 1
        self.stats.capture_s += time.perf_counter() - start

    def _capture(self, span: int, inputs):
        """Record one forward (capturing runs nothing, so no state changes)."""
        graph = torch.cuda.CUDAGraph()
        with self.recorder.recording(graph), varying_shape_attention(self.cache.device):
            outputs = self._forward(span, *inputs)
        return graph, outputs

    def _drop_graphs(self) -> None:
        self.stats.graphs_dropped += len(self.graphs)
        self.graphs.clear()
        self.warm.clear()
        self.recorder.release()

    def warm_up(self, seconds: float | None = None) -> int:
        """Capture the buckets of `shapes`, smallest first, for at most `seconds`, ahead of requests;
        no prompt may be in a staging slot (the forwards write padding at the staging slots' last
        position). Returns the graphs captured."""
        if not self.cuda_graphs:
            return 0
        seconds = WARMUP_SECONDS if seconds is None else seconds
        before, start = self.stats.prefill_captures, time.perf_counter()
        for shape in self.shapes():
            if not self.cuda_graphs or time.perf_counter() - start > seconds:
                break
            inputs = self._fill([], *shape)  # every row and token padding
            while shape not in self.graphs and self.cuda_graphs:
                self._run(shape, inputs)
        return self.stats.prefill_captures - before
