"""One decode step over the running requests: their last tokens in, next-token logits out.

Each row feeds one token at its own position (the request's length so far), writes its key and
value there (slot_cache.py) and attends over the first `span` positions of its slot, the rest
masked. The inputs live in fixed buffers (`tokens`, `positions`, one row per slot), so on a GPU
the step is captured as a CUDA graph per (rows, span) bucket and replayed: rows round up to a
power of two (the extra rows are free slots, whose results are ignored), span to the cache's
bucket. Graphs are captured lazily, after two eager steps of the same shape warm the kernels up,
and dropped when the cache grows. On a GPU the step has the bucketed shapes also when it runs
eagerly (a MoE block that syncs with the host, or cuda_graphs=False), so that the eager step is
the graph's twin; on the CPU it runs eagerly over exactly the running rows and the longest length,
unless it is compiled (bucketed shapes then, so that compiles are few).

On a prepared Phi model (engine.prepare) each layer's rotary embedding and slot-cache write run
as one op with a position per row (decode_attention.py: rotary_cache_write_rows); otherwise the
slot layer's `update` writes the keys and values.
"""

from __future__ import annotations

import logging

import torch

from ..errors import is_out_of_memory
from ..model.modeling import cache_argument
from .fast_path import graph_safe
from .slot_cache import BUCKET, SlotCache

WARMUP_STEPS = 2

logger = logging.getLogger(__name__)


def row_bucket(n: int, slots: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), slots)


class DecodeStep:
    def __init__(self, model, cache: SlotCache, cuda_graphs: bool | None = None, compile: bool | str = False):
        self.model, self.cache = model, cache
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
        mode = compile if isinstance(compile, str) else None
        self.compiled = bool(compile)
        self.forward = torch.compile(self._forward, dynamic=None, mode=mode) if compile else self._forward
        self.graphs: dict[tuple, tuple] = {}
        self.warm: dict[tuple, int] = {}
        self.pool = None
        self.version = cache.version

    def shape(self, n: int, longest: int) -> tuple[int, int]:
        """(rows, span) the step runs at for n rows whose longest has `longest` tokens after this one."""
        if self.cache.device.type != "cuda" and not self.compiled:  # exactly the running rows and the longest length
            return n, longest
        span = min(-(-longest // BUCKET) * BUCKET, self.cache.capacity)
        return row_bucket(n, self.cache.slots), span

    def __call__(self, n: int, longest: int) -> torch.Tensor:
        """Logits [n, V] (float) of the next token of rows 0..n-1."""
        try:
            return self._step(n, longest)
        except Exception as err:
            # A compiler that fails on the step (dynamo raises plain AssertionErrors too) must not fail
            # requests: the step runs uncompiled from now on. Out of memory is the caller's to handle.
            if not self.compiled or is_out_of_memory(err):
                raise
            logger.warning("torch.compile failed on the decode step (%s: %s); running it uncompiled from now on "
                           "(CUDA graphs stay on where they apply)", type(err).__name__, err)
            self.compiled, self.forward = False, self._forward
            self._drop_graphs()
            return self._step(n, longest)  # what a failed compiled call wrote, the eager step writes again

    def _drop_graphs(self) -> None:
        self.graphs.clear()
        self.warm.clear()
        self.pool = None  # the last graph of a pool frees it: capturing into its handle again fails

    def _step(self, n: int, longest: int) -> torch.Tensor:
        rows, span = self.shape(n, longest)
        self._prepare(rows, span)
        if not self.cuda_graphs:
            return self.forward(rows, span)[:n]
        if self.version != self.cache.version:  # the buffer moved: the graphs point at the old one
            self._drop_graphs()
            self.version = self.cache.version
        key = (rows, span)
        if key in self.graphs:
            graph, logits = self.graphs[key]
            graph.replay()
            return logits[:n]
        logits = self.forward(rows, span)
        self.warm[key] = self.warm.get(key, 0) + 1
        if self.warm[key] >= WARMUP_STEPS:
            self.graphs[key] = self._capture(rows, span)
        return logits[:n]

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
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all shapes: they never overlap
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(rows, span)
        return graph, logits
