"""Prefill written straight into the KV cache's staging slots (engine/prefill_step.py): on the CPU the
path runs without CUDA graphs, at the same padded shapes, and must give the reference loop's answers
and routing records whatever runs beside it. The graph bookkeeping (warm-up, replays, captures of
buckets warm-up did not reach, a failed capture) runs here through a stand-in graph;
tests/test_engine_gpu.py replays real ones."""

from __future__ import annotations

import pytest
import torch
from test_engine import QUESTIONS, assert_same, images, moe_model, reference, request

from medmoe.engine import Engine
from medmoe.engine.prefill_step import MIN_TOKENS
from medmoe.generation import SamplingConfig


@pytest.fixture(scope="module")
def phi():
    torch.manual_seed(0)
    return moe_model()


@pytest.mark.parametrize("name,expert_type", [("tiny-phi", "full"), ("tiny", "lora")])
def test_image_and_text_prompts_get_the_reference_answers_and_routing(name, expert_type):
    torch.manual_seed(0)
    model, processor = moe_model(name, "token", expert_type)
    cfg = SamplingConfig(max_new_tokens=10)
    staged = Engine(model, processor, max_slots=4, prefill_graphs=True)
    assert staged.prefill_step is not None and not staged.prefill_step.cuda_graphs  # the CPU: no graphs
    asks = [request(processor, q, i, cfg, output_routing=True) for q, i in zip(QUESTIONS, images())]
    results = staged.generate(asks)
    for result, q, i in zip(results, QUESTIONS, images()):
        assert_same(result, reference(model, processor, q, i, cfg))
    plain = Engine(model, processor, max_slots=4, prefill_graphs=False)
    assert plain.prefill_step is None
    for result, want in zip(results, plain.generate(asks)):
        assert len(result.prompt_routing) == len(want.prompt_routing) == len(model.moe_blocks)
        for got, expected in zip(result.prompt_routing, want.prompt_routing):
            assert got.expert_index.shape == (1, result.prompt_tokens, 1)
            assert torch.equal(got.expert_index, expected.expert_index)
            torch.testing.assert_close(got.probs, expected.probs)


@pytest.mark.parametrize("overlap", [False, True])
def test_cached_prefixes_chunks_and_requests_joining_a_running_batch(phi, overlap):
    """Round two starts from the prefix cache; prompts arriving while others decode are prefilled in
    16-token pieces into their staging slots, beside decode steps that must not disturb them.
    `overlap` (a GPU's default): a prefill's first tokens are handed out after the next decode
    step is launched."""
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, processor, max_slots=4, prefill_graphs=True, prefill_chunk=16, overlap_steps=overlap)
    expected = [reference(model, processor, q, i, cfg) for q, i in zip(QUESTIONS, images())]
    for _ in range(2):
        handles = []
        for q, i in zip(QUESTIONS, images()):
            handles.append(engine.submit(request(processor, q, i, cfg)))
            engine.step()
        for handle, want in zip(handles, expected):
            assert_same(handle.result(), want)
    assert engine.stats.reused_tokens > 3 * 100
    assert engine.stats.prefills > 2 * len(QUESTIONS)  # chunks: more forwards than prompts


def test_more_prompts_than_staging_slots_wait_for_one(phi):
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=3, ignore_eos=True)
    engine = Engine(model, processor, max_slots=6, prefill_graphs=True, admit_batch=2)
    engine.cache.staging = 2  # as if the slots were many more than the staging slots
    engine.prefill_step.slots = engine.prefill_step.slots[:2]
    prefilling = []
    original = engine._prefill
    engine._prefill = lambda pieces: prefilling.append(len(engine.prefilling)) or original(pieces)
    questions = [f"question number {k}?" for k in range(5)]
    results = engine.generate([request(processor, q, None, cfg) for q in questions])
    assert max(prefilling) == 2 and len(prefilling) >= 3
    for result, q in zip(results, questions):
        assert_same(result, reference(model, processor, q, None, cfg))


def test_per_sample_routing_keeps_the_models_own_prefill():
    model, processor = moe_model("tiny-phi", "pooled", "full")
    assert Engine(model, processor, max_slots=2, prefill_graphs=True).prefill_step is None


def test_buckets_round_rows_tokens_and_span_up_to_powers_of_two(phi):
    model, processor = phi
    engine = Engine(model, processor, max_slots=8, max_len=700, prefill_graphs=True, max_prefill_tokens=1024)
    engine.cache.reserve(700)
    step = engine.prefill_step
    assert engine.cache.staging == 8
    # (rows, tokens, span): span the furthest position reached, as tokens times a power of two
    assert step.shape(3, 10, 10) == (4, MIN_TOKENS, MIN_TOKENS)
    assert step.shape(3, 10, 200) == (4, MIN_TOKENS, 4 * MIN_TOKENS)
    assert step.shape(8, 300, 300) == (8, 512, 512) and step.shape(1, 650, 660) == (1, 700, 700)
    assert step.shape(1, 100, 600) == (1, 128, 700)  # at most the capacity
    shapes = step.shapes()
    assert step.shape(1, 100, 300) == (1, 128, 512)  # span: tokens times a power of four
    assert (1, 700, 700) in shapes and (8, 256, 700) in shapes and (1, 64, 256) in shapes
    assert shapes == sorted(shapes, key=lambda shape: (shape[0] * shape[1], shape[2]))  # warm-up: smallest first
    assert not any(r == 8 and t == 512 for r, t, _ in shapes)  # 4096 > 2 x 1024 tokens
    assert all(r * t <= 2 * 1024 and t <= s <= 700 for r, t, s in shapes)


def test_a_shape_larger_than_any_captured_runs_from_its_own_inputs(phi):
    """A forward larger than the graphs' input buffers runs eagerly without growing them."""
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=4, ignore_eos=True)
    engine = Engine(model, processor, max_slots=4, prefill_graphs=True, max_prefill_tokens=64)
    buffers = engine.prefill_step.embeds
    questions = [QUESTIONS[2] * 3, QUESTIONS[0]]
    results = engine.generate([request(processor, q, None, cfg) for q in questions])
    assert engine.prefill_step.embeds is buffers and buffers.numel() == 128 * model.language_model.config.hidden_size
    for result, q in zip(results, questions):
        assert_same(result, reference(model, processor, q, None, cfg))


def test_forwards_above_the_graph_arithmetic_bound_run_unpadded(phi, monkeypatch):
    """A forward whose padded arithmetic is large runs at its exact shape (no padding to pay for)."""
    from medmoe.engine import prefill_step

    model, processor = phi
    monkeypatch.setattr(prefill_step, "GRAPH_MAX_FLOPS", 0)
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    engine = Engine(model, processor, max_slots=4, prefill_graphs=True)
    shapes, forward = [], engine.prefill_step._forward
    engine.prefill_step._forward = lambda span, embeds, *rest: shapes.append((*embeds.shape[:2], span)) or forward(
        span, embeds, *rest)
    results = engine.generate([request(processor, q, i, cfg) for q, i in zip(QUESTIONS, images())])
    lengths = [r.prompt_tokens for r in results]
    assert shapes == [(len(QUESTIONS), max(lengths), max(lengths))] and not engine.prefill_step.shapes()
    for result, q, i in zip(results, QUESTIONS, images()):
        assert_same(result, reference(model, processor, q, i, cfg))


def test_a_prompt_cancelled_mid_prefill_frees_its_staging_slot_for_the_next(phi):
    """A long prompt cancelled between two of its pieces leaves its staging slot half written;
    the request that takes the slot next still gets the reference answer."""
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, processor, max_slots=2, prefill_graphs=True, prefill_chunk=16)
    assert engine.cache.staging == 2
    running = engine.submit(request(processor, QUESTIONS[0], None, cfg))
    engine.step()
    long = engine.submit(request(processor, QUESTIONS[2] * 4, images()[0], cfg))
    engine.step()
    engine.step()
    assert [job.handle for job in engine.prefilling] == [long] and engine.prefilling[0].done > 0
    stage = engine.prefilling[0].stage
    long.cancel()
    engine.step()
    assert not engine.prefilling and long.result().finish_reason == "cancelled"
    after = engine.submit(request(processor, QUESTIONS[1], images()[2], cfg))
    engine.step()
    assert [job.stage for job in engine.prefilling] == [stage]  # the freed slot, over what the cancelled one wrote
    assert_same(after.result(), reference(model, processor, QUESTIONS[1], images()[2], cfg))
    assert_same(running.result(), reference(model, processor, QUESTIONS[0], None, cfg))


class StandInGraph:
    """A CUDA graph's stand-in for the CPU: replay reruns the captured forward on the same inputs and
    writes into the outputs the capture returned, as a graph does."""

    def __init__(self, step, span, inputs, outputs):
        self.step, self.span, self.inputs, self.outputs = step, span, inputs, outputs

    def replay(self) -> None:
        logits, routing = self.step._forward(self.span, *self.inputs)
        self.outputs[0].copy_(logits)
        for kept, new in zip(self.outputs[1] or [], routing or []):
            kept.expert_index.copy_(new.expert_index)
            kept.probs.copy_(new.probs)


def stand_in_capture(fail_on: int | None = None):
    calls = []

    def capture(self, span, inputs):
        calls.append(span)
        if len(calls) == fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = self._forward(span, *inputs)  # tensors the replays overwrite
        return StandInGraph(self, span, inputs, outputs), outputs

    return capture, calls


def graphed_engine(model, processor, monkeypatch, fail_on: int | None = None, **options):
    """An engine whose prefill and decode step take the CUDA-graph paths on the CPU, through stand-ins;
    returns it and the prefill captures' record."""
    from test_engine_stats import stand_in_capture as decode_capture

    from medmoe.engine.decode_step import DecodeStep
    from medmoe.engine.prefill_step import PrefillStep

    capture, calls = stand_in_capture(fail_on)
    monkeypatch.setattr(DecodeStep, "_capture", decode_capture)
    monkeypatch.setattr(PrefillStep, "_capture", capture)
    engine = Engine(model, processor, max_slots=4, max_len=512, prefill_graphs=True, cuda_graphs=True,
                    overlap_steps=False, **options)
    engine.prefill_step.cuda_graphs = True  # the engine turns graphs on for CUDA devices only
    return engine, calls


ASKS = [(QUESTIONS[0], 0, 6), (" ".join(["describe the upper left lobe"] * 10), None, 20),
        (QUESTIONS[1], None, 8), (QUESTIONS[3], 2, 12)]


def answer_all(engine, processor, rounds=2):
    results = []
    for _ in range(rounds):  # the second round starts from the prefix cache
        handles = []
        for q, image, n in ASKS:
            img = images()[image] if image is not None else None
            handles.append(engine.submit(request(processor, q, img, SamplingConfig(max_new_tokens=n, ignore_eos=True))))
            engine.step()  # each joins a running batch
        results += [h.result() for h in handles]
    return results


def expected(model, processor, rounds=2):
    return [reference(model, processor, q, images()[i] if i is not None else None,
                      SamplingConfig(max_new_tokens=n, ignore_eos=True)) for q, i, n in ASKS] * rounds


def test_warmup_captures_every_bucket_and_requests_only_replay(phi, monkeypatch):
    from medmoe.engine import prefill_step

    monkeypatch.setattr(prefill_step, "WARMUP_SECONDS", 1e9)  # every bucket, however busy the machine
    model, processor = phi
    engine, _ = graphed_engine(model, processor, monkeypatch, prefill_chunk=64)
    engine.warmup()
    step = engine.prefill_step
    assert sorted(step.graphs) == sorted(step.shapes()) and engine.stats.prefill_captures == len(step.shapes())
    before = engine.stats.snapshot()
    results = answer_all(engine, processor)
    d = engine.stats.since(before)
    assert d.prefill_captures == 0 and d.prefill_replays == d.prefills > 8 and d.reused_tokens > 0
    for result, want in zip(results, expected(model, processor)):
        assert_same(result, want)


def test_buckets_warmup_did_not_reach_are_captured_when_they_recur(phi, monkeypatch):
    from medmoe.engine import prefill_step

    monkeypatch.setattr(prefill_step, "WARMUP_SECONDS", -1.0)  # no time for any capture
    model, processor = phi
    engine, _ = graphed_engine(model, processor, monkeypatch)
    engine.warmup()
    assert not engine.prefill_step.graphs
    results = answer_all(engine, processor, rounds=3)
    assert engine.stats.prefill_captures > 0 and engine.stats.prefill_replays > 0
    for result, want in zip(results, expected(model, processor, rounds=3)):
        assert_same(result, want)


def test_a_capture_that_fails_leaves_prefill_eager_with_the_same_answers(phi, monkeypatch):
    model, processor = phi
    engine, calls = graphed_engine(model, processor, monkeypatch, fail_on=2)
    engine.warmup()
    step = engine.prefill_step
    assert len(calls) == 2 and not step.cuda_graphs and not step.graphs and engine.stats.graph_fallbacks == 1
    results = answer_all(engine, processor)
    assert engine.stats.prefill_replays == 0 and len(calls) == 2
    for result, want in zip(results, expected(model, processor)):
        assert_same(result, want)


def test_a_question_whose_image_is_cached_skips_the_tower(phi, monkeypatch):
    """A second question about the same image starts from the prefix cache past the image tokens:
    its prompt's embeddings are made without the tower, and it still gets the reference answer."""
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    engine = Engine(model, processor, max_slots=4, prefill_graphs=True)
    image = images()[0]
    engine.generate([request(processor, QUESTIONS[0], image, cfg)])
    encoded = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: encoded.append(pixels.shape[0]) or encode(pixels))
    reused = engine.stats.reused_tokens
    results = engine.generate([request(processor, q, image, cfg) for q in QUESTIONS[1:3]]
                              + [request(processor, QUESTIONS[3], images()[2], cfg)])
    assert engine.stats.reused_tokens - reused > 2 * model.config.vision_config.num_tokens
    assert encoded == [1]  # the new image only
    for result, (q, i) in zip(results, [(QUESTIONS[1], image), (QUESTIONS[2], image), (QUESTIONS[3], images()[2])]):
        assert_same(result, reference(model, processor, q, i, cfg))
