"""Continuous batching: the engine that runs every request of every user path.

Each iteration of `step`:
  1. admits waiting requests into free slots, each starting from the longest prefix of its prompt
     whose keys and values an earlier request left in the prefix cache (prefix_cache.py: the
     template's system prompt, an image asked about again), and prefills the rest together,
     left-padded: whole prompts up to `max_prefill_tokens` per iteration; while requests decode, at
     most `prefill_chunk` tokens, a longer prompt in pieces over the next iterations, so that
     running streams are not stalled for long (a piece shorter than half the forward's longest,
     which would be mostly padding, waits: `_pieces`); on a GPU, while requests decode, waiting requests
     are admitted a few at once (`admit_batch`), since a prefill forward costs its kernel launches
     whatever its size. On a GPU (token routing) each prompt is prefilled into a staging slot of
     the cache, a small forward replayed from a CUDA graph (prefill_step.py); otherwise by the
     model's own forward. A request whose prompt is complete gets its keys and values copied into its slot
     (and the prefix cache) and its first token;
  2. runs ONE decode step over all running requests (decode_step.py) and hands each its next
     token by its own sampling settings;
  3. finishes requests at end-of-sequence (unless `ignore_eos`), a stop string, `max_new_tokens`,
     cancellation or their deadline, and keeps the running ones in slots 0..n-1 (the last one
     moves into a freed slot), so that the step runs on the cache's first rows without gathers.

The KV cache is bounded: `max_slots` requests run at once, each with at most `max_len` tokens of
prompt and answer; a request waits in the queue for a free slot, a request longer than `max_len`
is refused. The cache grows on demand; on a GPU, `warmup` allocates it at its bound (as much of it
as fits `KV_MEMORY_FRACTION` of the free memory) and captures the decode step's CUDA graph for
every (rows, span) bucket, so that no request grows the cache or captures a graph. `submit`
returns a Handle at once; `generate` runs a list of requests to the end in the calling thread;
`start()` runs the iterations in a background thread (the server). `stats` (stats.py) counts
what the engine did and where its time went.

    engine = Engine(model, processor, max_slots=16)
    results = engine.generate([Request(encode_question(processor, "What is shown?", image))])
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function
from transformers import DynamicCache

from ..config import RuntimeOptions
from ..errors import ConfigError, MedMoEError
from ..generation.generate import SamplingConfig, eos_ids, prefill_shared_prefix, shared_prefix_length
from ..model.attention_kernels import varying_shape_attention
from .confidence import ClosedCandidates, answer_confidence
from .decode_step import WARMUP_STEPS, DecodeStep, bucket_shapes, row_bucket
from .fast_path import graph_safe
from .prefill_kernels import tower_batch
from .prefill_step import PrefillStep
from .prefix_cache import PrefixCache, prompt_key, reuse_safe, weights_version
from .request import Delta, Handle, Prompt, Request, Result, TokenLogprob
from .routing_records import Records, forward_records, join_records, row_records
from .sampling import MAX_TOP_LOGPROBS, chosen_logprobs, logprobs_by_row, pick_tokens, token_logprobs
from .slot_cache import BUCKET, SlotCache
from .stats import EngineStats
from .tower_graphs import TowerGraphs
from .transfer import to_device

logger = logging.getLogger(__name__)
IDLE_RELEASE_S = 1.0  # seconds without work before the background runner frees the KV cache (CPU)
IDLE_PREFIX_KEEP_BYTES = 8 << 20  # what of the prefix cache an idle CPU runner keeps (the shared system prompt)
CPU_PREFILL_CHUNK, CUDA_PREFILL_CHUNK = 256, 2048  # default prompt tokens prefilled between decode steps
ADMIT_DELAY_STEPS = 8  # the most decode steps a waiting request is held back to be prefilled with others
KV_MEMORY_FRACTION = 0.75  # of the GPU's free memory, the most warm-up allocates for the KV cache
MIN_STAGING_SLOTS = 8  # prompts prefilled at once into staging slots (prefill_step.py), at least (or max_slots)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate (free, and held by torch's allocator unused); None off a GPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def keep_out_of_gc() -> None:
    """Put every object alive now out of the garbage collector's sight (`gc.freeze`), for a process
    that keeps its model to its end (the server, `medmoe eval`): Python's full collections then no
    longer walk the model's and the tokenizer's objects, which stalled the engine's iterations for
    65 to 82 ms every few hundred requests (docs/lab/speed-history.md, run Q). Frozen objects are
    never collected, so a process that swaps models does not call it."""
    gc.collect()
    gc.freeze()


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps them for reuse otherwise, so a
    burst's prefill activations would stay in the process's resident memory); best effort."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _config_eos(model) -> set[int]:
    eos = getattr(model.config.llm_config(), "eos_token_id", None)
    return {eos} if isinstance(eos, int) else set(eos or ())


class EngineBusy(MedMoEError):
    """The engine's queue is full."""


class RequestTooLong(MedMoEError, ValueError):
    """A request needs more tokens than a slot holds."""


@dataclass
class _Running:
    """A request in a slot."""
    handle: Handle
    cfg: SamplingConfig
    generator: torch.Generator | None
    length: int  # tokens in the cache (the next token is fed at this position)
    prompt_ids: list[int]
    routing: Records | None
    tokens: list[int] = field(default_factory=list)
    pending: int = 0  # steps launched whose token the request has not been handed yet
    text: str = ""
    sent: str = ""
    logprobs: list[TokenLogprob] | None = None
    logprob_sum: float = 0.0  # of the answer tokens, for the answer's confidence
    candidate_logprobs: list[float] | None = None  # at the first token, of each closed answer (confidence.py)
    generated: int = 0
    finish: str | None = None


@dataclass
class _Prefilling:
    """A request in a slot whose prompt is being prefilled (in pieces when it is long)."""
    handle: Handle
    key: tuple | None = None  # its prefix-cache key (None: not cached)
    done: int = 0  # prompt tokens whose keys and values are in `past` (or in its staging slot)
    past: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values [layers, kv heads, done, head dim]
    stage: int | None = None  # its staging slot, where prefill_step.py writes its keys and values
    routing: Records | None = None  # records of the first `done` tokens
    embeds: torch.Tensor | None = None  # the whole prompt's input embeddings (made once, when needed)

    @property
    def prompt(self) -> Prompt:
        return self.handle.request.prompt

    @property
    def left(self) -> int:
        return len(self.prompt.input_ids) - self.done


@dataclass
class _Picked:
    """The tokens one step picked (on the host, or on their way there until `done`)."""
    runs: list[_Running]  # the requests of the step's rows, in row order when it was launched
    tokens: torch.Tensor
    chosen: torch.Tensor  # log p of each row's token, for every row
    scores: tuple | None  # token_logprobs of the rows in `wanted`
    wanted: list[int]
    top: list[int]
    done: torch.cuda.Event | None
    candidates: torch.Tensor | None = None  # first tokens: [rows, closed answers] log-probabilities


class Engine:
    def __init__(self, model, processor=None, max_slots: int = 8, max_len: int | None = None,
                 max_prefill_tokens: int = 4096, max_waiting: int | None = None,
                 cuda_graphs: bool | None = None, compile: bool | str = False, overlap_steps: bool | None = None,
                 prefix_cache_mb: float | None = None, prefill_chunk: int | None = None,
                 admit_batch: int | None = None, prefill_graphs: bool | None = None):
        """`processor`: None for token-only use (benchmarks: no text, end ids from the model's config).
        `cuda_graphs`: None: on a GPU when every MoE block runs without host syncs. `compile`: the
        decode step through torch.compile (True, or its mode); call `warmup` before serving, so
        that no request waits for a compile.
        `overlap_steps` (default: on a GPU): launch each decode step before handing out the previous
        step's tokens, and a prefill's first tokens, so that the host's work (sampling bookkeeping,
        detokenising, streaming) runs while the device computes; a request that ends then costs its
        row one extra step.
        `prefix_cache_mb` (0: off) and `prefill_chunk` (0: whole prompts): config.RuntimeOptions; both
        only where the model routes by token (prefix_cache.reuse_safe).
        `admit_batch` (config.RuntimeOptions; None: a quarter of the slots on a GPU, 1 on the CPU):
        while requests decode, waiting requests take free slots only once this many are free or the
        oldest has waited ADMIT_DELAY_STEPS steps, so that their prompts share one prefill forward.
        `prefill_graphs` (config.RuntimeOptions; None: where the decode step's CUDA graphs apply):
        prompts are prefilled straight into staging slots of the KV cache, a small forward as a CUDA
        graph per bucket (prefill_step.py); token routing only. True on the CPU runs the same path
        without graphs."""
        self.model, self.processor = model.eval(), processor
        lm = model.language_model
        weight = lm.get_input_embeddings().weight
        # The cache grows on demand, so a generous default costs nothing until a request needs it.
        self.max_len = max_len or max(getattr(lm.config, "max_position_embeddings", None) or 0, 4096)
        self.max_slots = max_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        defaults = RuntimeOptions()
        mb = defaults.prefix_cache_mb if prefix_cache_mb is None else prefix_cache_mb
        safe = reuse_safe(model)
        self.prefix_cache = PrefixCache(int(mb * 2**20)) if mb > 0 and safe else None
        chunk = defaults.prefill_chunk if prefill_chunk is None else prefill_chunk
        if chunk is None:  # a GPU prefills 2048 tokens in about the time of a few decode steps
            chunk = CUDA_PREFILL_CHUNK if weight.device.type == "cuda" else CPU_PREFILL_CHUNK
        self.prefill_chunk = chunk if safe else 0
        self.prefilling: list[_Prefilling] = []  # in slots, prompts being prefilled
        admit = defaults.admit_batch if admit_batch is None else admit_batch
        if admit is None:
            admit = max(1, max_slots // 4) if weight.device.type == "cuda" else 1
        if admit < 1:
            raise ConfigError(f"admit_batch {admit}: give at least 1 (1: waiting requests take free slots at every step)")
        self.admit_batch = min(admit, max_slots)
        self.held_steps = 0  # decode steps the oldest waiting request has been held back (admit_batch)
        self.stats = EngineStats()
        if cuda_graphs is None:
            cuda_graphs = weight.device.type == "cuda" and graph_safe(model, weight.dtype, weight.device)
        staged = defaults.prefill_graphs if prefill_graphs is None else prefill_graphs
        staged = (cuda_graphs if staged is None else staged) and safe
        staging = min(max_slots, max(self.admit_batch, MIN_STAGING_SLOTS)) if staged else 0
        self.cache = SlotCache(lm.config, max_slots, self.max_len, weight.dtype, weight.device, staging=staging)
        self.step_fn = DecodeStep(model, self.cache, cuda_graphs, compile, self.stats)
        graphed = cuda_graphs and weight.device.type == "cuda"
        self.prefill_step = PrefillStep(model, self.cache, graphed, max_prefill_tokens, self.stats) if staging else None
        # The tower in CUDA graphs where prefill forwards are graphed (a GPU, token routing, a tower to run).
        self.tower = (TowerGraphs(model, staging, self.stats)
                      if staging and graphed and getattr(model, "vision_tower", None) is not None else None)
        self.warm = False  # warmup() has run
        # On a GPU the buffer stays (its CUDA graphs hold its address); on the CPU it is reallocated
        # at the next burst, cheaply, and the process's memory returns to where it started.
        self.release_when_idle = weight.device.type != "cuda"
        self.eos = eos_ids(model, processor) if processor is not None else _config_eos(model)
        self.pad_id = (processor.tokenizer.pad_token_id or 0) if processor is not None else 0
        self.candidates = ClosedCandidates.of(processor, weight.device) if processor is not None else None
        self.overlap_steps = weight.device.type == "cuda" if overlap_steps is None else overlap_steps
        self.in_flight: _Picked | None = None
        self.first_tokens: list[_Picked] = []  # prefills' first tokens, picked on the device, not yet handed out
        # Prompts to keep in the prefix cache once the next decode step is launched: (key, slot, length, routing)
        self.to_cache: list[tuple] = []
        self.active: list[_Running] = []
        self.waiting: collections.deque[Handle] = collections.deque()
        self.incoming: collections.deque[Handle] = collections.deque()
        self.lock = threading.Lock()  # guards incoming
        self.stepping = threading.Lock()  # one thread steps at a time
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    # ----- submitting -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self.incoming) + len(self.waiting)

    def submit(self, request: Request) -> Handle:
        need = len(request.prompt.input_ids) + max(request.sampling.max_new_tokens, 1)
        if need > self.max_len:
            raise RequestTooLong(f"the prompt ({len(request.prompt.input_ids)} tokens) and max_new_tokens "
                                 f"({request.sampling.max_new_tokens}) exceed the {self.max_len} tokens of an "
                                 "engine slot; shorten the prompt or lower max_new_tokens")
        handle = Handle(request, self)
        if request.sampling.max_new_tokens <= 0:  # nothing to generate (as the reference loop)
            ids = list(request.prompt.input_ids)
            handle._finish(Result("", [], "length", len(ids), ids))
            return handle
        with self.lock:
            if self.max_waiting is not None and self.queued >= self.max_waiting:
                raise EngineBusy("server busy: the request queue is full; retry shortly")
            self.incoming.append(handle)
        self.wake.set()
        return handle

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run `requests` to the end (in this thread, or by the background runner when it runs)."""
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def wait(self, handle: Handle, timeout: float | None = None) -> None:
        if self.running:
            handle._done.wait(timeout)
            return
        while not handle.done:
            self.step()

    def warmup(self) -> None:
        """Run short text requests through prefill and decode steps, so that the first user
        requests do not pay for kernel set-up, torch.compile or graph capture: one batch per row
        bucket where the step is bucketed (a GPU, a compiled step), one request on the CPU. On a
        GPU the KV cache is allocated at its bound first (`kv_plan`) and the step's graph is
        captured for every (rows, span) bucket up to it (`bucket_shapes`), so that no request
        grows the cache or captures a graph. A compiled step also runs one and two requests into
        the second length bucket: the shapes that changed become symbolic (one row stays its own
        case), so that no later request compiles."""
        start = time.perf_counter()
        captures = self.stats.graph_captures
        step = self.step_fn
        if self.cache.device.type == "cuda" or step.cuda_graphs:
            self._allocate_at_bound()
        ids = self.processor(["hello"])["input_ids"][0].tolist() if self.processor is not None else [0] * 8
        cfg = SamplingConfig(max_new_tokens=WARMUP_STEPS + 3, ignore_eos=True)
        sizes = sorted({row_bucket(n, self.max_slots) for n in range(1, self.max_slots + 1)})
        for size in sizes if step.cuda_graphs or step.compiled else [1]:
            self.generate([Request(Prompt(ids), cfg) for _ in range(size)])
        long = BUCKET  # every step attends over more than BUCKET positions
        if step.compiled and long + cfg.max_new_tokens <= self.max_len:
            for size in sorted({1, min(2, self.max_slots)}):
                self.generate([Request(Prompt((ids * long)[:long]), cfg) for _ in range(size)])
        if step.cuda_graphs and self.cache.capacity:
            shapes = bucket_shapes(self.max_slots, self.cache.capacity)
            with torch.no_grad():
                step.warm_up(shapes)
            logger.info("warm-up: %d CUDA graphs (%d rows x %d spans), KV cache %d slots x %d tokens (%.1f GiB)",
                        len(step.graphs), len({r for r, _ in shapes}), len({s for _, s in shapes}),
                        self.max_slots, self.cache.capacity, self.cache.nbytes() / 2**30)
        prefill = self.prefill_step
        if prefill is not None and prefill.cuda_graphs and self.cache.capacity:
            with torch.no_grad():
                prefill.warm_up()
            logger.info("warm-up: %d prefill CUDA graphs (%d staging slots)", len(prefill.graphs), self.cache.staging)
        if self.tower is not None:
            vision = self.model.config.vision_config
            with torch.no_grad():
                self.tower.warm_up(vision.image_size, next(self.model.vision_tower.parameters()).dtype,
                                   self.cache.device)
        self.stats.warmup_captures += self.stats.graph_captures - captures
        self.stats.warmup_s += time.perf_counter() - start
        self.warm = True

    def kv_plan(self, free_bytes: int | None) -> int:
        """Tokens per slot warm-up allocates: `max_len`, or as many buckets of it as fit
        KV_MEMORY_FRACTION of `free_bytes` (at least one)."""
        if free_bytes is None:
            return self.max_len
        per_token = (self.max_slots + self.cache.staging) * self.cache.bytes_per_token()
        fit = int(free_bytes * KV_MEMORY_FRACTION) // per_token // BUCKET * BUCKET
        return min(self.max_len, max(fit, BUCKET))

    def _allocate_at_bound(self) -> None:
        if self.cache.capacity == self.max_len:  # at its bound already: an earlier warm-up's graphs stay
            return
        if self.active or self.prefilling:
            raise RuntimeError("Engine.warmup runs before requests, not while they hold slots")
        self._release_cache()  # a buffer being replaced is not kept beside the new one
        capacity = self.kv_plan(free_device_memory(self.cache.device))
        self._reserve(capacity)
        if capacity < self.max_len:
            logger.warning("the KV cache of %d slots x %d tokens needs %.1f GiB, more than %.0f%% of the GPU's free "
                           "memory: slots start with %d tokens and grow when a longer request comes (which captures "
                           "the step's graphs again); lower the slots (medmoe serve --max-batch) or the tokens a "
                           "request may hold (--max-prompt-tokens, --max-tokens) to keep it within memory",
                           self.max_slots, self.max_len,
                           self.max_slots * self.max_len * self.cache.bytes_per_token() / 2**30,
                           100 * KV_MEMORY_FRACTION, capacity)

    def _reserve(self, length: int) -> None:
        """Cache capacity for `length` tokens; a reallocation of a buffer in use is a growth (a copy,
        and every captured graph dropped)."""
        before = self.cache.capacity
        self.cache.reserve(length)
        if self.cache.capacity != before:
            self.stats.cache_allocations += 1
            self.stats.cache_growths += before > 0
        self.stats.cache_capacity = self.cache.capacity

    def _release_cache(self) -> None:
        if self.cache.kv is not None:
            self.cache.release()
            self.stats.cache_releases += 1
            self.stats.cache_capacity = 0

    # ----- the background runner ----------------------------------------------------------------
    def start(self) -> None:
        if self.running:
            return
        self.stopping.clear()
        self.thread = threading.Thread(target=self._loop, name="medmoe-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.thread = None

    def _loop(self) -> None:
        idle_since = None
        while not self.stopping.is_set():
            if self.step():
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if self.release_when_idle and self.cache.kv is not None and time.monotonic() - idle_since > IDLE_RELEASE_S:
                self._release_cache()  # a CPU server gives its KV memory back between bursts
                if self.prefix_cache is not None:
                    self.prefix_cache.shrink(IDLE_PREFIX_KEEP_BYTES)
                _return_freed_memory()
            waited = time.perf_counter()
            self.wake.wait(0.05)
            self.wake.clear()
            self.stats.idle_s += time.perf_counter() - waited

    @contextlib.contextmanager
    def exclusive(self):
        """The model to the caller between two of the engine's steps (label scoring beside a serving
        engine): no step starts meanwhile, and a step still running on the device comes first on
        its stream. The engine's next step sets up again whatever a plain forward changed."""
        with self.stepping, torch.no_grad():
            yield

    # ----- one iteration -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Admit and prefill what fits, then one decode step; False when there was nothing to do."""
        with self.stepping:
            start = time.perf_counter()
            try:
                return self._step()
            finally:
                self.stats.step_s += time.perf_counter() - start

    def _step(self) -> bool:
        with self.lock:
            self.waiting.extend(self.incoming)
            self.incoming.clear()
        self._drop_cancelled()
        admitted = self._admit()
        previous, self.in_flight = self.in_flight, None
        firsts, self.first_tokens = self.first_tokens, []
        try:
            launched = self._decode() if self.active else None
            self._cache_prefixes()  # before any hand-out moves a slot
            if self.overlap_steps:
                # The host hands out the previous step's tokens while the device runs this one.
                self.in_flight = launched
                launched = None
            for picked in (previous, launched):
                if picked is not None:
                    self._hand_out(picked)
            if firsts:  # this step's prefill's first tokens (their wait for the device counts as prefill)
                start = time.perf_counter()
                for picked in firsts:
                    self._hand_out(picked, timed=False)
                self.stats.prefill_s += time.perf_counter() - start
        except Exception as err:  # a bug or out of memory: fail the running requests, keep serving
            logger.exception("decode step failed for %d requests", len(self.active))
            for run in self.active:
                run.handle._finish(None, err)
            self.stats.requests_failed += len(self.active)
            self.active, self.in_flight, self.to_cache = [], None, []
            self.step_fn.positions.zero_()
        return (admitted or previous is not None or self.in_flight is not None or bool(self.active)
                or bool(self.prefilling))

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        keep = collections.deque()
        for handle in self.waiting:
            deadline = handle.request.deadline
            if handle.cancelled or (deadline is not None and now > deadline):
                handle._finish(Result("", [], "cancelled", len(handle.request.prompt.input_ids),
                                      list(handle.request.prompt.input_ids)))
                self.stats.requests_cancelled += 1
            else:
                keep.append(handle)
        self.waiting = keep
        for job in list(self.prefilling):
            deadline = job.handle.request.deadline
            if job.handle.cancelled or (deadline is not None and now > deadline):
                self.prefilling.remove(job)
                ids = list(job.prompt.input_ids)
                job.handle._finish(Result("", [], "cancelled", len(ids), ids))
                self.stats.requests_cancelled += 1
        for i in reversed(range(len(self.active))):
            run = self.active[i]
            deadline = run.handle.request.deadline
            if run.handle.cancelled or (deadline is not None and now > deadline):
                run.finish = "cancelled"
                self._release(i)

    def _admit(self) -> bool:
        """Give free slots to waiting requests (their prompts' cached prefixes copied in), then run
        this iteration's prefill: whole prompts up to `max_prefill_tokens`; while requests decode,
        at most `prefill_chunk` tokens, a longer prompt in pieces over the next iterations, so that
        the running streams are not stalled for long."""
        if self.prefix_cache is not None and self.waiting:
            self.prefix_cache.check(weights_version(self.model))
        if self._admitting():
            while (self.waiting and len(self.active) + len(self.prefilling) < self.max_slots
                   and (self.prefill_step is None or len(self.prefilling) < self.cache.staging)):
                self.prefilling.append(self._start(self.waiting.popleft()))
        pieces = self._pieces(self.prefill_chunk if self.active else 0)
        if not pieces:
            return False
        running = len(self.active)
        start = time.perf_counter()
        try:
            self._prefill(pieces)
        except Exception as err:
            del self.active[running:]  # what the failed prefill had placed
            if len(pieces) > 1:  # one bad prompt must not fail the others: each alone
                for job, n in pieces:
                    self._prefill_alone(job, n)
            else:
                self._drop(pieces[0][0], err)
        self.stats.prefill_s += time.perf_counter() - start
        return True

    def _pieces(self, chunk: int) -> list[tuple[_Prefilling, int]]:
        """This iteration's prefill: (prompt, its next n tokens), in admission order, whole prompts
        up to the budget (`chunk` prompt tokens while requests decode, else `max_prefill_tokens`,
        the first prompt whole whatever its length); with a chunk, a prompt longer than what is
        left of it goes in pieces. A forward pads every row to its longest piece, so a piece shorter
        than half the longest waits for the next iteration: it would cost a row of mostly padding
        (two 113-token prompts and a 30-token piece of a third computed 339 tokens for 256)."""
        budget = chunk or self.max_prefill_tokens
        pieces: list[tuple[_Prefilling, int]] = []
        longest = 0
        for job in self.prefilling:
            if job.left <= budget or not (pieces or chunk):
                n = job.left
            elif chunk and budget > 0 and (not pieces or 2 * budget >= longest):
                n = budget
            else:
                break
            pieces.append((job, n))
            longest = max(longest, n)
            budget -= n
            if budget <= 0:
                break
        return pieces

    def _admitting(self) -> bool:
        """Whether waiting requests take free slots now: always when nothing decodes; while requests
        decode, once `admit_batch` slots are free or the oldest has been held back ADMIT_DELAY_STEPS
        decode steps (a slot free all that time), or when a prefill forward runs anyway (a long
        prompt's next piece), so that prompts arriving a few steps apart share one prefill."""
        if not self.waiting:
            self.held_steps = 0
            return False
        free = self.max_slots - len(self.active) - len(self.prefilling)
        if (not self.active or self.prefilling or free >= self.admit_batch
                or self.held_steps >= ADMIT_DELAY_STEPS):
            self.held_steps = 0
            return True
        if free > 0:
            self.held_steps += 1
        return False

    def _start(self, handle: Handle) -> _Prefilling:
        """A request enters a slot; the longest prefix of its prompt in the prefix cache is its start."""
        job = _Prefilling(handle)
        if self.prefill_step is not None:
            taken = {other.stage for other in self.prefilling}
            job.stage = next(s for s in range(self.max_slots, self.max_slots + self.cache.staging) if s not in taken)
            self._reserve(len(handle.request.prompt.input_ids) + handle.request.sampling.max_new_tokens)
        self.stats.requests_admitted += 1
        self.stats.queue_wait_s += time.perf_counter() - handle.submitted
        prompt = handle.request.prompt
        if self.prefix_cache is not None and handle.request.sampling.share_prefix:
            job.key = prompt_key(prompt.input_ids, prompt.pixel_values, self.model.config.image_token_id,
                                 prompt.image_digests)
            if job.key is not None:
                hit = self.prefix_cache.match(job.key, len(job.key) - 1, self._wants_routing(handle))
                if hit.length:
                    job.done, job.routing = hit.length, hit.routing
                    if job.stage is None:
                        job.past = (hit.kv[0], hit.kv[1])
                    else:
                        self.cache.load(job.stage, hit.kv[0], hit.kv[1])
                    self.stats.reused_tokens += hit.length
        return job

    def _wants_routing(self, handle: Handle) -> bool:
        return handle.request.output_routing and self.model.is_moe

    def _prefill_alone(self, job: _Prefilling, n: int) -> None:
        if job not in self.prefilling:
            return
        running = len(self.active)
        try:
            self._prefill([(job, min(n, job.left))])
        except Exception as err:
            del self.active[running:]
            self._drop(job, err)

    def _drop(self, job: _Prefilling, err: Exception) -> None:
        if job in self.prefilling:
            self.prefilling.remove(job)
        self._fail(job.handle, err)

    def _fail(self, handle: Handle, err: Exception) -> None:
        if not isinstance(err, (MedMoEError, ValueError)):
            logger.exception("prefill failed", exc_info=err)
        self.stats.requests_failed += 1
        handle._finish(None, err)

    # ----- prefill ---------------------------------------------------------------------------------
    def _prefill(self, pieces: list[tuple[_Prefilling, int]]) -> None:
        """Run the pieces in one forward; a request whose prompt is complete goes into the next
        slot (its keys and values into the prefix cache) and gets its first token."""
        with varying_shape_attention(self.cache.device), record_function("engine.prefill_forward"):
            if self.prefill_step is not None:
                rows, logits = self._prefill_staged(pieces)
            elif all(job.done == 0 and n == job.left for job, n in pieces):
                rows, logits = self._prefill_prompts([job for job, _ in pieces])
            else:
                rows, logits = self._prefill_pieces(pieces)
        with record_function("engine.prefill_finish"):
            self._finish_prefill(pieces, rows, logits)

    def _finish_prefill(self, pieces, rows, logits) -> None:
        """After the forward: complete prompts move to decode slots (and the prefix cache) and get
        their first tokens; pieces of longer ones keep their keys and values for the next."""
        complete = [job for job, n in pieces if n == job.left]
        if complete:
            needs = [r.length + r.cfg.max_new_tokens - r.generated for r in self.active]
            needs += [len(job.prompt.input_ids) + job.handle.request.sampling.max_new_tokens for job in complete]
            self._reserve(max(needs))
        first = len(self.active)
        finished = []
        for row, ((job, n), (segment, records, probs)) in enumerate(zip(pieces, rows)):
            job.routing = join_records(job.routing, records) if job.done == 0 or job.routing is not None else None
            if n < job.left:  # a piece of a long prompt: its keys and values wait for the rest
                if segment is not None:
                    job.past = segment if job.past is None else tuple(torch.cat(p, 2) for p in zip(job.past, segment))
                job.done += n
                continue
            slot, length = len(self.active), len(job.prompt.input_ids)
            if job.stage is not None:
                self.cache.move(job.stage, slot, length)
            else:
                if job.past is not None:
                    self.cache.load(slot, *job.past)
                self.cache.load(slot, *segment, at=job.done)
            for layer, slot_probs in self.step_fn.slot_probs.items():
                if layer in probs:
                    slot_probs[slot].copy_(probs[layer])
            self.prefilling.remove(job)
            if job.key is not None and self.prefix_cache is not None:
                self.to_cache.append((job.key, slot, length, job.routing))
            cfg = job.handle.request.sampling
            generator = None
            if cfg.do_sample and cfg.seed is not None:
                generator = torch.Generator(device=self.cache.device).manual_seed(cfg.seed)
            self.active.append(_Running(job.handle, cfg, generator, length, list(job.prompt.input_ids),
                                        job.routing if self._wants_routing(job.handle) else None,
                                        logprobs=[] if cfg.logprobs else None))
            finished.append(row)
        if not finished:
            return
        lengths = [r.length for r in self.active[first:]]
        self.step_fn.positions[first:first + len(lengths)] = to_device(lengths, self.cache.device)
        rows_done = to_device(finished, logits.device)
        picked = self._pick(logits.index_select(0, rows_done), self.active[first:], first, first_tokens=True)
        if self.overlap_steps:  # handed out once the next decode step is launched (_step): no wait here
            self.first_tokens.append(picked)
        else:
            self._hand_out(picked, timed=False)

    def _cache_prefixes(self) -> None:
        """Keep the prompts prefilled this iteration in the prefix cache. It runs after the next decode
        step is launched: reading their routing records may wait for the prefill forward, and the
        device is then busy meanwhile. The decode step writes past each prompt, so its keys and
        values are unchanged."""
        entries, self.to_cache = self.to_cache, []
        for key, slot, length, routing in entries:
            try:
                self.prefix_cache.insert(key, self.cache.kv[:, :, slot, :, :length], routing)
            except Exception:  # out of memory for the copy: the prompt is not cached, its request runs on
                logger.warning("keeping a prompt in the prefix cache failed; it is not cached", exc_info=True)

    def _prefill_prompts(self, jobs: list[_Prefilling]):
        """Whole prompts, left-padded, through the model's own forward (images, per-sample routing,
        the batch's common start prefilled once). Returns per row (its keys and values, routing
        records, per-sample routing probabilities) and the last positions' logits."""
        model = self.model
        device = self.cache.device
        prompts = [job.prompt for job in jobs]
        lengths = [len(p.input_ids) for p in prompts]
        width = max(lengths)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row's last token in the last column
            ids[row, width - lengths[row]:] = torch.tensor(prompt.input_ids, dtype=torch.long)
            mask[row, width - lengths[row]:] = 1
        pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
        pixels = torch.cat(pixels).to(device) if pixels else None
        ids, mask = ids.to(device), mask.to(device)
        want_routing = any(self._wants_routing(job.handle) for job in jobs)
        shared = 0
        if all(job.handle.request.sampling.share_prefix for job in jobs):
            shared = shared_prefix_length(model, ids, mask)
        if shared:  # the prompts' common start (the template's system prompt) prefilled once
            out, _, _, routing = prefill_shared_prefix(model, ids, mask, shared, pixels, output_routing=want_routing)
        else:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=DynamicCache(), use_cache=True,
                        output_routing=want_routing, logits_to_keep=1)
            routing = out.routing
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(lengths) - shared * (len(jobs) - 1)
        probs = dict(model.moe_state.sample_probs)
        batch_records = forward_records(routing)
        keys = torch.stack([layer.keys for layer in out.cache.layers])  # [layers, B, kv heads, width, head dim]
        values = torch.stack([layer.values for layer in out.cache.layers])
        rows = []
        for row in range(len(jobs)):
            start = width - lengths[row]
            if shared:  # row layout [shared prefix][padding][own tokens]
                segment = tuple(torch.cat([t[:, row, :, :shared], t[:, row, :, shared + start:]], 2)
                                for t in (keys, values))
            else:  # [padding][prompt]
                segment = (keys[:, row, :, start:], values[:, row, :, start:])
            records = row_records(batch_records, row, start)  # in the left-padded layout
            rows.append((segment, records, {layer: p[row] for layer, p in probs.items()}))
        return rows, out.logits[:, -1].float()

    def _prefill_pieces(self, pieces: list[tuple[_Prefilling, int]]):
        """The next n tokens of each prompt, after the keys and values it has (from the prefix cache or
        its earlier pieces): rows laid out [padding][past][padding][new], each token at its position.
        Token routing only (prefix_cache.reuse_safe). Returns as `_prefill_prompts`."""
        model, c = self.model, self.cache
        device = c.device
        past = max(job.done for job, _ in pieces)
        width = max(n for _, n in pieces)
        ids = torch.full((len(pieces), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), past + width), dtype=torch.long)
        positions = torch.zeros((len(pieces), width), dtype=torch.long)
        for row, (job, n) in enumerate(pieces):
            ids[row, width - n:] = torch.tensor(job.prompt.input_ids[job.done:job.done + n], dtype=torch.long)
            mask[row, past - job.done:past] = 1
            mask[row, past + width - n:] = 1
            positions[row, width - n:] = torch.arange(job.done, job.done + n)
        cache = DynamicCache()
        if past:
            keys = torch.zeros(c.num_layers, len(pieces), c.kv_heads, past, c.head_dim, dtype=c.dtype, device=device)
            values = torch.zeros_like(keys)
            for row, (job, _) in enumerate(pieces):
                if job.done:
                    keys[:, row, :, past - job.done:] = job.past[0]
                    values[:, row, :, past - job.done:] = job.past[1]
            for layer in range(c.num_layers):
                cache.update(keys[layer], values[layer], layer)
        embeds = model.embed_inputs(ids.to(device), None)
        image_id = model.config.image_token_id
        with_images = [(row, job, n) for row, (job, n) in enumerate(pieces)
                       if image_id is not None and image_id in job.prompt.input_ids[job.done:job.done + n]]
        self._encode_prompts([job for _, job, _ in with_images])
        for row, job, n in with_images:
            embeds[row, width - n:] = job.embeds[job.done:job.done + n]
        want_routing = any(self._wants_routing(job.handle) for job, _ in pieces)
        out = model(inputs_embeds=embeds, attention_mask=mask.to(device), position_ids=positions.to(device),
                    cache=cache, use_cache=True, output_routing=want_routing, logits_to_keep=1)
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(n for _, n in pieces)
        keys = torch.stack([layer.keys[:, :, past:] for layer in out.cache.layers])
        values = torch.stack([layer.values[:, :, past:] for layer in out.cache.layers])
        batch_records = forward_records(out.routing)
        rows = []
        for row, (job, n) in enumerate(pieces):
            records = row_records(batch_records, row, width - n)
            rows.append(((keys[:, row, :, width - n:], values[:, row, :, width - n:]), records, {}))
        return rows, out.logits[:, -1].float()

    def _prefill_staged(self, pieces: list[tuple[_Prefilling, int]]):
        """The pieces through prefill_step.py, each written into its staging slot. Returns as
        `_prefill_prompts`, without keys and values (they are in the staging slots)."""
        self._encode_prompts([job for job, _ in pieces])
        logits, routing = self.prefill_step([(job.stage, job.done, job.embeds[job.done:job.done + n])
                                             for job, n in pieces])
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(n for _, n in pieces)
        want_routing = any(self._wants_routing(job.handle) for job, _ in pieces)
        batch_records = forward_records(routing) if want_routing else None
        width = batch_records.expert_index.shape[2] if batch_records is not None else 0
        return [(None, row_records(batch_records, row, width - n), {}) for row, (_, n) in enumerate(pieces)], logits

    def _encode_prompts(self, jobs: list[_Prefilling]) -> None:
        """Each job's whole-prompt input embeddings, images spliced in (made once per request), all
        `jobs` at once and their images through the tower in one batch: on a GPU a tower's forward
        costs its kernel launches whatever the batch, so one image at a time would cost that per request."""
        jobs = [job for job in jobs if job.embeds is None]
        if jobs:
            with record_function("engine.encode_prompts"):
                self._encode(jobs)

    def _encode(self, jobs: list[_Prefilling]) -> None:
        model, device = self.model, self.cache.device
        image_id = model.config.image_token_id
        # A prompt whose image tokens all came from the prefix cache (another question about the same
        # image) needs no tower: only its tokens from `done` on are prefilled.
        cached = {id(job) for job in jobs if job.prompt.pixel_values is not None
                  and image_id not in job.prompt.input_ids[job.done:]}
        pixels = [job.prompt.pixel_values for job in jobs
                  if job.prompt.pixel_values is not None and id(job) not in cached]
        tokens = None
        if pixels:
            tower_dtype = next(model.vision_tower.parameters()).dtype
            pixels = to_device(pixels, device).to(tower_dtype)
            count = pixels.shape[0]
            padded = tower_batch(count, device)
            if padded > count:  # zero images to a batch size the tower has run before (prefill_kernels.py)
                pixels = torch.cat([pixels, pixels.new_zeros(padded - count, *pixels.shape[1:])])
            tokens = (self.tower or model.encode_images)(pixels)[:count]
        # One splice for all jobs, at image positions found on the host (no read from the device).
        lengths = [len(job.prompt.input_ids) for job in jobs]
        pad = self.pad_id if self.pad_id != image_id else 0
        ids = torch.full((len(jobs), max(lengths)), pad, dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, :lengths[row]] = torch.tensor(job.prompt.input_ids, dtype=torch.long)
            if id(job) in cached:  # its image positions stay text embeddings, never read
                ids[row, ids[row] == image_id] = pad
        positions = (ids.view(-1) == image_id).nonzero().squeeze(1) if tokens is not None else None
        if positions is not None:
            positions = to_device(positions, device)
        embeds = model.embed_inputs(to_device(ids, device), None, image_tokens=tokens, image_positions=positions)
        for row, job in enumerate(jobs):
            job.embeds = embeds[row, :lengths[row]]

    # ----- decode ------------------------------------------------------------------------------
    def _decode(self) -> _Picked | None:
        """Launch one decode step of every running request and the picking of their tokens (device
        work, no host sync), unless every one of them has all its tokens already."""
        runs = list(self.active)
        if all(r.generated + r.pending >= r.cfg.max_new_tokens for r in runs):
            return None
        with record_function("engine.decode_launch"):
            return self._launch(runs)

    def _launch(self, runs: list[_Running]) -> _Picked:
        start = time.perf_counter()
        stats = self.stats
        stats.largest_batch = max(stats.largest_batch, len(runs))
        stats.decode_steps += 1
        stats.decode_rows += len(runs)
        logits = self.step_fn(len(runs), max(r.length for r in runs) + 1)
        self.step_fn.positions[:len(runs)] += 1
        for run in runs:
            run.length += 1
        picked = self._pick(logits, runs, 0)
        stats.launch_s += time.perf_counter() - start
        return picked

    def _pick(self, logits: torch.Tensor, runs: list[_Running], first: int, first_tokens: bool = False) -> _Picked:
        """The next token of rows first.. (logits [rows, V]) into the step's token buffer, and their
        log-probabilities where asked for, copied towards the host without waiting. `first_tokens`:
        the answers' first tokens, with the closed answers' log-probabilities (their confidence)."""
        tokens = pick_tokens(logits, [r.cfg for r in runs], [r.generator for r in runs])
        self.step_fn.tokens[first:first + len(runs)].copy_(tokens)
        wanted = [i for i, r in enumerate(runs) if r.cfg.logprobs]
        top = [min(max(r.cfg.top_logprobs, 0), MAX_TOP_LOGPROBS) for r in runs if r.cfg.logprobs]
        scores = token_logprobs(logits, tokens, wanted, top)
        chosen = chosen_logprobs(logits, tokens)
        candidates = self.candidates.logprobs(logits) if first_tokens and self.candidates is not None else None
        for run in runs:
            run.pending += 1
        done = None
        if tokens.is_cuda:
            tokens = tokens.to("cpu", non_blocking=True)  # into pinned memory, in stream order
            chosen = chosen.to("cpu", non_blocking=True)
            candidates = candidates.to("cpu", non_blocking=True) if candidates is not None else None
            scores = tuple(t.to("cpu", non_blocking=True) for t in scores) if scores is not None else None
            done = torch.cuda.Event()
            done.record()
        return _Picked(runs, tokens, chosen, scores, wanted, top, done, candidates)

    def _hand_out(self, picked: _Picked, timed: bool = True) -> None:
        """Give each request its token once it is on the host; release the requests that finished.
        A request that finished (or was cancelled) after the step was launched ignores its token.
        `timed`: into the stats' device wait and hand-out (a prefill's first tokens count as prefill)."""
        with record_function("engine.hand_out"):
            self._give_tokens(picked, timed)

    def _give_tokens(self, picked: _Picked, timed: bool) -> None:
        start = time.perf_counter()
        if picked.done is not None:
            picked.done.synchronize()
            synced = time.perf_counter()
            self.stats.device_wait_s += (synced - start) * timed
            start = synced
        scores = logprobs_by_row(picked.scores, picked.wanted, picked.top)
        if picked.candidates is not None:
            for run, row in zip(picked.runs, picked.candidates.tolist()):
                run.candidate_logprobs = row
        for i, (run, token, logp) in enumerate(zip(picked.runs, picked.tokens.tolist(), picked.chosen.tolist())):
            run.pending -= 1
            if run.finish is None and self._accept(run, token, logp, scores.get(i)):
                self._release(self.active.index(run))
        self.stats.hand_out_s += (time.perf_counter() - start) * timed

    def _accept(self, run: _Running, token: int, logp: float, score) -> bool:
        """Hand one token to its request; True when the request has finished."""
        cfg = run.cfg
        run.generated += 1
        self.stats.tokens_generated += 1
        if run.generated == 1:
            self.stats.first_tokens += 1
            self.stats.first_token_s += time.perf_counter() - run.handle.submitted
        new: list[int] = []
        entry = None
        if token in self.eos and not cfg.ignore_eos:
            run.finish = "eos"
        else:
            run.tokens.append(token)
            run.logprob_sum += logp
            new = [token]
            text = self.processor.decode(run.tokens) if self.processor is not None else ""
            for stop in cfg.stop:
                if stop and stop in text:
                    text, run.finish = text[: text.index(stop)], "stop"
            run.text = text
            if score is not None:
                entry = self._logprob_entry(token, score)
                run.logprobs.append(entry)
        if run.finish is None and run.generated >= cfg.max_new_tokens:
            run.finish = "length"
        piece = ""
        text = run.text
        if run.finish is not None:
            if len(text) > len(run.sent) and text.startswith(run.sent):  # flush what was held back
                piece = text[len(run.sent):]
        elif not text.endswith("\ufffd") and len(text) > len(run.sent):
            piece = text[len(run.sent):]
        if piece:
            run.sent = text
        if piece or new:
            run.handle._emit(Delta(piece, new, [entry] if entry is not None else None))
        return run.finish is not None

    def _logprob_entry(self, token: int, score) -> TokenLogprob:
        chosen, top = score
        name = self._token_text
        return TokenLogprob(token, name(token), chosen, [(i, name(i), p) for i, p in top])

    def _token_text(self, token: int) -> str:
        return self.processor.tokenizer.decode([token]) if self.processor is not None else str(token)

    def _release(self, slot: int) -> None:
        """Finish the request in `slot` and move the last running request into it."""
        run = self.active[slot]
        last = len(self.active) - 1
        if slot != last:
            moved = self.active[last]
            self.cache.move(last, slot, moved.length)
            for buffer in (self.step_fn.tokens, self.step_fn.positions, *self.step_fn.slot_probs.values()):
                buffer[slot].copy_(buffer[last])
            self.active[slot] = moved
        self.active.pop()
        self.step_fn.positions[last].zero_()  # a kernel: `= 0` would copy from pageable memory and wait
        confidence = answer_confidence(run.logprob_sum, run.tokens, run.text, self.candidates, run.candidate_logprobs)
        result = Result(run.text.strip(), run.tokens, run.finish or "cancelled", len(run.prompt_ids), run.prompt_ids,
                        None if run.routing is None else run.routing.as_layers(), run.logprobs, confidence)
        if result.finish_reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
            self.stats.request_s += time.perf_counter() - run.handle.submitted
        run.handle._finish(result)
