"""One decode step over the running requests: their last tokens in, next-token logits out.

Each row feeds one token at its own position (the request's length so far), writes its key and
value there (slot_cache.py) and attends over the first `span` positions of its slot, the rest
masked. The inputs live in fixed buffers (`tokens`, `positions`, one row per slot), so on a GPU
the step is captured as a CUDA graph per (rows, span) bucket and replayed: rows round up to a
power of two (the extra rows are free slots, whose results are ignored), span to the cache's
bucket. Graphs are captured after two eager steps of the same shape warm the kernels up: every
bucket at once by `warm_up` (Engine.warmup: the cache at its bound first), else when a shape first
occurs; they are dropped when the cache grows. On a GPU the step has the bucketed shapes also when it runs
eagerly (a MoE block that syncs with the host, or cuda_graphs=False), so that the eager step is
the graph's twin; on the CPU it runs eagerly over exactly the running rows and the longest length,
unless it is compiled (bucketed shapes then, so that compiles are few).

On a prepared Phi model (engine.prepare) each layer's rotary embedding and slot-cache write run
as one op with a position per row (decode_attention.py: rotary_cache_write_rows); otherwise the
slot layer's `update` writes the keys and values.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import is_out_of_memory
from ..model.modeling import cache_argument
from .fast_path import graph_safe
from .graph_capture import GraphRecorder
from .prefill_kernels import pow2_at_least
from .slot_cache import BUCKET, SlotCache
from .stats import EngineStats

WARMUP_STEPS = 2

logger = logging.getLogger(__name__)


def row_bucket(n: int, slots: int) -> int:
    return min(pow2_at_least(n), slots)


def bucket_shapes(slots: int, capacity: int) -> list[tuple[int, int]]:
    """Every (rows, span) a bucketed step can run at with `slots` rows of `capacity` tokens."""
    rows = sorted({row_bucket(n, slots) for n in range(1, slots + 1)})
    spans = sorted({min(k * BUCKET, capacity) for k in range(1, -(-capacity // BUCKET) + 1)})
    return [(r, s) for r in rows for s in spans]


class DecodeStep:
    def __init__(self, model, cache: SlotCache, cuda_graphs: bool | None = None, compile: bool | str = False,
                 stats: EngineStats | None = None):
        self.model, self.cache = model, cache
        self.stats = stats if stats is not None else EngineStats()
        self.lm = model.language_model
        self.cache_name = cache_argument(self.lm)
        device = cache.device
        slots = cache.slots
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.columns = torch.arange(cache.max_len, device=device)
        self.min = torch.finfo(cache.dtype).min
        # Per-sample routing ("sample"/"pooled"): each slot's expert probabilities, layer -> [slots, E].
        self.slot_probs: dict[int, torch.Tensor] = {}
        per_sample = [b for b in model.moe_blocks if b.cfg.routing != "token"]
        for block in per_sample:
            e = block.cfg.num_experts
            self.slot_probs[block.layer_idx] = torch.full((slots, e), 1.0 / e, device=device)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and graph_safe(model, cache.dtype, device)
        self.cuda_graphs = cuda_graphs
        # A mode must leave inductor's own CUDA graphs off ("max-autotune-no-cudagraphs"): ours capture the step.
        # Shapes are static at first and become symbolic where they change (rows, span, capacity), so a
        # few compiles (Engine.warmup makes them) cover every bucket, each still its own CUDA graph.
        # torch 2.11's dynamo failed on the recompile that makes shapes symbolic; a compile that fails so
        # is retried once with every shape symbolic from the start (`dynamic=True`), then dropped.
        self.compile_mode = compile if isinstance(compile, str) else None
        self.compiled = bool(compile)
        self.dynamic: bool | None = None
        self.forward = torch.compile(self._forward, dynamic=None, mode=self.compile_mode) if compile else self._forward
        self.graphs: dict[tuple, tuple] = {}
        self.warm: dict[tuple, int] = {}
        self.recorder = GraphRecorder()
        self.version = cache.version

    def shape(self, n: int, longest: int) -> tuple[int, int]:
        """(rows, span) the step runs at for n rows whose longest has `longest` tokens after this one."""
        if not (self.cache.device.type == "cuda" or self.cuda_graphs or self.compiled):  # exactly the running rows and the longest length
            return n, longest
        span = min(-(-longest // BUCKET) * BUCKET, self.cache.capacity)
        return row_bucket(n, self.cache.slots), span

    def __call__(self, n: int, longest: int) -> torch.Tensor:
        """Logits [n, V] (float) of the next token of rows 0..n-1."""
        return self._guarded(*self.shape(n, longest))[:n]

    def _guarded(self, rows: int, span: int) -> torch.Tensor:
        try:
            return self._run(rows, span)
        except Exception as err:
            # A compiler that fails on the step (dynamo raises plain AssertionErrors too) must not fail
            # requests: the step runs uncompiled from now on. Out of memory is the caller's to handle.
            if not self.compiled or is_out_of_memory(err):
                raise
            if self.dynamic is None:
                logger.warning("torch.compile failed on the decode step (%s: %s); compiling it again with every "
                               "shape symbolic", type(err).__name__, err)
                self.dynamic = True
                self.forward = torch.compile(self._forward, dynamic=True, mode=self.compile_mode)
            else:
                logger.warning("torch.compile failed on the decode step (%s: %s); running it uncompiled from now on "
                               "(CUDA graphs stay on where they apply)", type(err).__name__, err)
                self.compiled, self.forward = False, self._forward
            self.stats.compile_fallbacks += 1
            self._drop_graphs()
            return self._guarded(rows, span)  # what a failed compiled call wrote, the retry writes again

    def _drop_graphs(self) -> None:
        self.stats.graphs_dropped += len(self.graphs)
        self.graphs.clear()
        self.warm.clear()
        self.recorder.release()

    def _run(self, rows: int, span: int) -> torch.Tensor:
        self._prepare(rows, span)
        if not self.cuda_graphs:
            self.stats.eager_steps += 1
            return self.forward(rows, span)
        if self.version != self.cache.version:  # the buffer moved: the graphs point at the old one
            self._drop_graphs()
            self.version = self.cache.version
        key = (rows, span)
        if key in self.graphs:
            graph, logits = self.graphs[key]
            graph.replay()
            self.stats.graph_replays += 1
            return logits
        logits = self.forward(rows, span)
        self.stats.eager_steps += 1
        self.warm[key] = self.warm.get(key, 0) + 1
        if self.warm[key] >= WARMUP_STEPS:
            start = time.perf_counter()
            try:
                self.graphs[key] = self._capture(rows, span)
            except Exception as err:
                # A step that cannot be captured still decodes: eagerly, at the same shapes. Out
                # of memory is the caller's to handle (the engine's queue waits, the server answers 503).
                if is_out_of_memory(err):
                    raise
                self._disable_graphs(err)
                return logits
            self.stats.graph_captures += 1
            self.stats.capture_s += time.perf_counter() - start
        return logits

    def _disable_graphs(self, err: Exception) -> None:
        logger.warning("capturing the decode step's CUDA graph failed (%s: %s); decoding without CUDA graphs "
                       "from now on (slower, the same tokens)", type(err).__name__, err)
        self.cuda_graphs = False
        self.stats.graph_fallbacks += 1
        self._drop_graphs()

    def warm_up(self, shapes: list[tuple[int, int]]) -> int:
        """Capture the graphs of `shapes` ((rows, span) buckets) ahead of requests, each after its
        eager warm-up steps; no request may hold a slot (the steps write into the cache, at the last
        position of each span, which a request overwrites before it reads). Returns the graphs captured."""
        if not self.cuda_graphs:
            return 0
        before = self.stats.graph_captures
        for rows, span in shapes:
            if not self.cuda_graphs:  # a capture failed: the step runs eagerly, nothing more to capture
                break
            self.positions[:rows] = span - 1
            self._guarded(rows, span)  # drops graphs of a moved cache first
            while (rows, span) not in self.graphs and self.cuda_graphs:
                self._guarded(rows, span)
        self.positions.zero_()
        self.tokens.zero_()
        return self.stats.graph_captures - before

    def _prepare(self, rows: int, span: int) -> None:
        state = self.model.moe_state
        state.start(None, False, False)
        state.sample_probs = {layer: probs[:rows] for layer, probs in self.slot_probs.items()}
        self.cache.rows, self.cache.span = rows, span
        self.cache.write_at = self.positions[:rows]

    def _forward(self, rows: int, span: int) -> torch.Tensor:
        positions = self.positions[:rows]
        visible = self.columns[:span][None, :] <= positions[:, None]
        bias = torch.full((rows, 1, 1, span), self.min, dtype=self.cache.dtype, device=positions.device)
        bias.masked_fill_(visible[:, None, None, :], 0.0)
        embeds = self.lm.get_input_embeddings()(self.tokens[:rows, None])
        out = self.lm(inputs_embeds=embeds, attention_mask=bias, position_ids=positions[:, None], use_cache=True,
                      logits_to_keep=1, **{self.cache_name: self.cache})
        return out.logits[:, -1].float()

    def _capture(self, rows: int, span: int):
        """Record one step (capturing runs nothing, so no state changes)."""
        graph = torch.cuda.CUDAGraph()
        with self.recorder.recording(graph):
            logits = self.forward(rows, span)
        return graph, logits
