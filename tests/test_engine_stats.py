"""The engine's statistics (engine/stats.py) count what happened, and the warm-up plan (which
(rows, span) buckets warm-up captures, how much KV cache it allocates). CUDA graphs cannot be
captured on the CPU: here a stand-in graph (replay runs the step's forward into fixed logits)
checks the warm-up's logic; tests/test_engine_gpu.py checks the same with real graphs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medmoe.engine import Engine, Request, encode_question
from medmoe.engine import scheduler
from medmoe.engine.decode_step import DecodeStep, bucket_shapes
from medmoe.engine.slot_cache import BUCKET
from medmoe.engine.stats import EngineStats, delta
from medmoe.generation import SamplingConfig, run_generation
from medmoe.model.pretrained import build_model

QUESTIONS = ["What modality is this image?", "Any fracture?", "hi"]


def tiny_model():
    torch.manual_seed(0)
    model, processor = build_model("tiny-phi")
    model.upcycle({"routing": "token", "expert_type": "full"})
    return model.eval(), processor


def test_bucket_shapes_cover_every_row_and_span_bucket_up_to_the_capacity():
    shapes = bucket_shapes(32, 4608)  # the server's defaults on a GPU: 32 slots, 4096 + 512 tokens
    assert sorted({r for r, _ in shapes}) == [1, 2, 4, 8, 16, 32]
    assert sorted({s for _, s in shapes}) == list(range(256, 4608 + 1, 256))
    assert len(shapes) == 6 * 18
    assert bucket_shapes(4, 600) == [(r, s) for r in (1, 2, 4) for s in (256, 512, 600)]
    assert bucket_shapes(64, 123) == [(r, 123) for r in (1, 2, 4, 8, 16, 32, 64)]  # eval of nano: one span
    assert bucket_shapes(3, 256) == [(1, 256), (2, 256), (3, 256)]  # rows round up to the slots at most


def test_kv_plan_allocates_the_bound_or_the_buckets_that_fit():
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=4, max_len=1000)
    per_token = 4 * engine.cache.bytes_per_token()
    assert engine.kv_plan(None) == 1000  # the CPU (a test's stand-in graphs): the whole bound
    assert engine.kv_plan(10**12) == 1000
    budget = int(600 * per_token / scheduler.KV_MEMORY_FRACTION)  # 600 tokens fit: two whole buckets
    assert engine.kv_plan(budget) == 512
    assert engine.kv_plan(1) == BUCKET  # at least one bucket


def test_counters_of_a_batch_on_the_cpu():
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=4, overlap_steps=False, prefix_cache_mb=0)
    lengths = [5, 3, 8]
    cfgs = [SamplingConfig(max_new_tokens=n, ignore_eos=True, share_prefix=False) for n in lengths]
    prompts = [encode_question(processor, q, None) for q in QUESTIONS]
    results = engine.generate([Request(p, c) for p, c in zip(prompts, cfgs)])
    s = engine.stats
    assert [r.completion_tokens for r in results] == lengths
    assert (s.requests_admitted, s.requests_finished, s.requests_cancelled, s.requests_failed) == (3, 3, 0, 0)
    assert s.tokens_generated == sum(lengths) and s.first_tokens == 3
    assert s.prefill_tokens == sum(len(p.input_ids) for p in prompts) and s.prefills == 1
    # The first tokens come from the prefill; then 7 steps: 3 rows twice, 2 rows twice, 1 row three times.
    assert (s.decode_steps, s.decode_rows, s.largest_batch) == (7, 3 * 2 + 2 * 2 + 3, 3)
    assert (s.eager_steps, s.graph_replays, s.graph_captures) == (7, 0, 0)  # no graphs on the CPU
    assert (s.cache_allocations, s.cache_growths, s.cache_capacity) == (1, 0, BUCKET)
    assert s.step_s > 0 and s.prefill_s > 0 and s.launch_s > 0 and s.hand_out_s > 0 and s.queue_wait_s >= 0
    assert s.request_s >= s.first_token_s >= s.queue_wait_s
    assert s.prefill_s + s.launch_s + s.hand_out_s + s.device_wait_s <= s.step_s  # phases do not overlap
    before = s.snapshot()
    long = SamplingConfig(max_new_tokens=BUCKET, ignore_eos=True)  # past the first bucket: the cache grows
    engine.generate([Request(prompts[2], long)])
    grown = engine.stats.since(before)
    assert (grown.cache_allocations, grown.cache_growths, grown.cache_capacity) == (1, 1, 2 * BUCKET)
    assert grown.requests_finished == 1 and grown.decode_steps == BUCKET - 1 and grown.largest_batch == 3


def test_cancelled_requests_are_counted():
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=1, overlap_steps=False)
    cfg = SamplingConfig(max_new_tokens=20, ignore_eos=True)
    running = engine.submit(Request(encode_question(processor, QUESTIONS[0], None), cfg))
    waiting = engine.submit(Request(encode_question(processor, QUESTIONS[1], None), cfg))
    engine.step()
    running.cancel()
    waiting.cancel()
    engine.step()
    assert running.result().finish_reason == "cancelled" and waiting.result().finish_reason == "cancelled"
    assert (engine.stats.requests_cancelled, engine.stats.requests_finished, engine.stats.requests_admitted) == (2, 0, 1)


def test_delta_subtracts_counters_and_keeps_levels():
    before = EngineStats(decode_steps=10, capture_s=1.5, largest_batch=8, cache_capacity=256)
    after = EngineStats(decode_steps=25, capture_s=2.0, largest_batch=4, cache_capacity=512)
    d = delta(after.as_dict(), before.as_dict())
    assert (d["decode_steps"], d["capture_s"], d["largest_batch"], d["cache_capacity"]) == (15, 0.5, 4, 512)
    line = after.since(before).summary()
    assert "15 decode steps" in line and "0 cache growths" in line


class StandInGraph:
    """What a CUDA graph does for the step: replay computes into fixed logits (capture runs nothing)."""

    def __init__(self, step: DecodeStep, rows: int, span: int, logits: torch.Tensor):
        self.step, self.rows, self.span, self.logits = step, rows, span, logits

    def replay(self) -> None:
        self.step._prepare(self.rows, self.span)
        self.logits.copy_(self.step._forward(self.rows, self.span))


def stand_in_capture(self, rows: int, span: int):
    logits = torch.empty(rows, self.lm.get_output_embeddings().out_features)
    return StandInGraph(self, rows, span, logits), logits


def test_warmup_captures_every_bucket_and_no_request_captures_or_grows(monkeypatch):
    """With graphs on, warm-up allocates the cache at its bound and captures each (rows, span)
    bucket; then short, long and image requests, joining a running batch, replay only, and get
    the reference loop's tokens."""
    monkeypatch.setattr(DecodeStep, "_capture", stand_in_capture)
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=4, max_len=600, cuda_graphs=True, overlap_steps=False)
    engine.warmup()
    s = engine.stats
    assert engine.warm and engine.cache.capacity == 600 and s.cache_capacity == 600
    assert sorted(engine.step_fn.graphs) == bucket_shapes(4, 600)
    assert s.graph_captures == s.warmup_captures == 9 and s.warmup_s > 0
    assert not engine.step_fn.positions.any()  # warm-up leaves the rows' positions as it found them
    before = s.snapshot()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    long_question = " ".join(["describe the upper left lobe"] * 10)  # a prompt past the first span bucket
    asks = [(QUESTIONS[0], image, 6), (long_question, None, 30), (QUESTIONS[1], None, 12), (QUESTIONS[2], image, 40)]
    handles = []
    for q, img, n in asks:
        handles.append(engine.submit(Request(encode_question(processor, q, img),
                                             SamplingConfig(max_new_tokens=n, ignore_eos=True))))
        engine.step()  # each joins the running batch
    results = [h.result() for h in handles]
    d = engine.stats.since(before)
    assert len(encode_question(processor, long_question, None).input_ids) > BUCKET
    assert (d.graph_captures, d.cache_growths, d.cache_allocations, d.eager_steps, d.graphs_dropped) == (0, 0, 0, 0, 0)
    assert d.graph_replays == d.decode_steps > 0 and d.requests_finished == 4
    for (q, img, n), result in zip(asks, results):
        cfg = SamplingConfig(max_new_tokens=n, ignore_eos=True)
        assert result.token_ids == run_generation(model, processor, [q], [img], cfg).token_ids[0]


def test_a_cache_bound_that_does_not_fit_grows_past_the_allocated_buckets(monkeypatch):
    monkeypatch.setattr(DecodeStep, "_capture", stand_in_capture)
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=2, max_len=600, cuda_graphs=True, overlap_steps=False)
    per_token = 2 * engine.cache.bytes_per_token()
    monkeypatch.setattr(scheduler, "free_device_memory", lambda device: int(300 * per_token / scheduler.KV_MEMORY_FRACTION))
    engine.warmup()
    assert engine.cache.capacity == BUCKET and sorted(engine.step_fn.graphs) == [(1, 256), (2, 256)]
    before = engine.stats.snapshot()
    engine.generate([Request(encode_question(processor, QUESTIONS[0], None),
                             SamplingConfig(max_new_tokens=BUCKET, ignore_eos=True))])
    d = engine.stats.since(before)
    assert d.cache_growths == 1 and d.graphs_dropped == 2 and d.graph_captures >= 1 and d.cache_capacity == 2 * BUCKET


def test_warmup_on_the_cpu_allocates_no_more_than_before():
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=4, max_len=2048)
    engine.warmup()
    assert engine.cache.capacity == BUCKET and engine.stats.graph_captures == 0 and engine.stats.decode_steps > 0


def test_a_second_warmup_keeps_the_cache_and_its_graphs(monkeypatch):
    monkeypatch.setattr(DecodeStep, "_capture", stand_in_capture)
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=2, max_len=300, cuda_graphs=True, overlap_steps=False)
    engine.warmup()
    before = engine.stats.snapshot()
    engine.warmup()
    again = engine.stats.since(before)
    assert (again.cache_allocations, again.cache_releases, again.graph_captures, again.graphs_dropped) == (0, 0, 0, 0)
    assert again.graph_replays > 0 and len(engine.step_fn.graphs) == 4


def test_the_bundled_model_decodes_in_graphs_in_the_dtype_eval_loads_it_in_on_a_gpu():
    """`medmoe eval` loads nano in bfloat16 with the engine's layers on a GPU (load_for_inference);
    its LoRA experts then run fused with the meta expert, without host syncs: graph_safe."""
    from medmoe.engine.fast_path import graph_safe
    from medmoe.loading import load_for_inference

    model, _ = load_for_inference("nano", "cpu", "bfloat16", fuse_qkv=True)
    assert model.dtype == torch.bfloat16 and graph_safe(model, torch.bfloat16, torch.device("cpu"))
    model.moe_blocks[0].experts.fuse_with_shared = False  # the per-expert loop syncs with the host
    assert not graph_safe(model, torch.bfloat16, torch.device("cpu"))


def test_a_capture_that_fails_leaves_the_step_eager_with_the_same_tokens(monkeypatch):
    """A graph that cannot be captured (a driver or kernel fault) costs speed, not answers: warm-up
    stops capturing, the step runs eagerly at the same shapes, and out of memory still propagates."""
    calls = []

    def capture_fails_on_the_second(self, rows, span):
        calls.append((rows, span))
        if len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return stand_in_capture(self, rows, span)

    monkeypatch.setattr(DecodeStep, "_capture", capture_fails_on_the_second)
    model, processor = tiny_model()
    engine = Engine(model, processor, max_slots=4, max_len=600, cuda_graphs=True, overlap_steps=False)
    engine.warmup()
    s = engine.stats
    assert (s.graph_fallbacks, s.graph_captures, len(calls)) == (1, 1, 2)
    assert not engine.step_fn.cuda_graphs and not engine.step_fn.graphs and s.graphs_dropped == 1
    assert "1 graph fallbacks" in s.summary()
    cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    result = engine.generate([Request(encode_question(processor, QUESTIONS[0], None), cfg)])[0]
    assert result.token_ids == run_generation(model, processor, [QUESTIONS[0]], None, cfg).token_ids[0]

    def capture_out_of_memory(self, rows, span):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DecodeStep, "_capture", capture_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        Engine(model, processor, max_slots=4, max_len=600, cuda_graphs=True, overlap_steps=False).warmup()
