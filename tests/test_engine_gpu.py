"""On a GPU: the engine's CUDA-graph decode steps give the eager steps' tokens, with the fused
projections and experts on a side stream (what load_for_inference installs), for requests of
different lengths joining and leaving. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from medmoe.engine import Engine, Request, encode_question
from medmoe.generation import SamplingConfig, run_generation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUESTIONS = ["What modality is this image?", "Any fracture?", "Describe the finding in detail, please.", "hi", "where?"]


def fused_model(routing: str, expert_type: str, dtype=torch.bfloat16):
    from medmoe.engine.prepare import prepare
    from medmoe.model.pretrained import build_model

    torch.manual_seed(0)
    model, processor = build_model("tiny-phi")
    model.upcycle({"routing": routing, "expert_type": expert_type, "expert_lora": {"rank": 4, "alpha": 8}})
    for block in model.moe_blocks:
        with torch.no_grad():
            for weight in (block.experts.w_in,) if expert_type == "full" else (block.experts.b_in, block.experts.b_out):
                weight.add_(torch.randn_like(weight) * 0.05)
    model = model.to("cuda", dtype).eval()
    prepare(model)
    return model, processor


def run(engine: Engine, processor, lengths):
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    handles = []
    for i, (q, n) in enumerate(zip(QUESTIONS, lengths)):
        handles.append(engine.submit(Request(encode_question(processor, q, image if i % 2 == 0 else None),
                                             SamplingConfig(max_new_tokens=n, ignore_eos=True))))
        engine.step()  # each request joins a running batch
    return [h.result() for h in handles]


@pytest.mark.parametrize("routing,expert_type", [("token", "full"), ("pooled", "full"), ("token", "lora")])
def test_graph_steps_equal_eager_steps(routing, expert_type):
    model, processor = fused_model(routing, expert_type)
    lengths = [20, 6, 30, 3, 12]
    graphed = Engine(model, processor, max_slots=8)
    assert graphed.step_fn.cuda_graphs
    fast = run(graphed, processor, lengths)
    assert graphed.step_fn.graphs  # the steps were replayed from graphs
    slow = run(Engine(model, processor, max_slots=8, cuda_graphs=False, overlap_steps=False), processor, lengths)
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]
    assert [len(r.token_ids) for r in fast] == lengths


def test_engine_matches_the_reference_loop_on_the_gpu():
    model, processor = fused_model("token", "full", torch.float32)
    cfg = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    engine = Engine(model, processor, max_slots=4)
    results = engine.generate([Request(encode_question(processor, q, None), cfg) for q in QUESTIONS[:3]])
    for q, result in zip(QUESTIONS, results):
        assert result.token_ids == run_generation(model, processor, [q], None, cfg).token_ids[0]


def test_cached_prefixes_and_chunked_prefill_on_the_gpu():
    """The second round starts from prefixes in the prefix cache, while the first of its requests
    decodes the others are prefilled in 16-token pieces."""
    model, processor = fused_model("token", "full", torch.float32)
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, processor, max_slots=4, prefill_chunk=16)
    expected = [run_generation(model, processor, [q], None, cfg).token_ids[0] for q in QUESTIONS[:3]]
    for _ in range(2):
        handles = []
        for q in QUESTIONS[:3]:
            handles.append(engine.submit(Request(encode_question(processor, q, None), cfg)))
            engine.step()
        assert [h.result().token_ids for h in handles] == expected
    assert engine.stats.reused_tokens > 3 * 100


def test_graphs_captured_again_after_the_cache_grows():
    """An answer longer than the cache's first bucket moves the cache: the step's graphs are dropped
    and captured again into a fresh memory pool (capturing into the freed one fails)."""
    model, processor = fused_model("token", "full")

    def answers(engine):  # a short answer captures graphs in the first bucket, a long one moves the cache
        return [engine.generate([Request(encode_question(processor, QUESTIONS[0], None),
                                         SamplingConfig(max_new_tokens=n, ignore_eos=True))])[0].token_ids
                for n in (20, 300)]

    graphed = Engine(model, processor, max_slots=2)
    fast = answers(graphed)
    assert graphed.cache.version >= 2 and graphed.step_fn.graphs
    # The same prefill path without graphs: bf16 answers this long follow the prefill's kernels.
    slow = answers(Engine(model, processor, max_slots=2, cuda_graphs=False, overlap_steps=False, prefill_graphs=True))
    assert fast == slow and [len(t) for t in fast] == [20, 300]


def test_after_warmup_no_request_captures_a_graph_or_grows_the_cache():
    """Warm-up allocates the cache at its bound and captures every (rows, span) bucket: short, long
    and image requests joining a running batch then only replay graphs, and get the tokens of the
    same engine's eager steps (bf16: graphs need sync-free experts; the eager step is the graph's twin)."""
    from PIL import Image

    from medmoe.engine.decode_step import bucket_shapes

    model, processor = fused_model("token", "full")
    engine = Engine(model, processor, max_slots=4, max_len=700)
    assert engine.step_fn.cuda_graphs
    engine.warmup()
    assert engine.cache.capacity == 700 and sorted(engine.step_fn.graphs) == bucket_shapes(4, 700)
    assert engine.stats.warmup_captures == len(bucket_shapes(4, 700))
    before = engine.stats.snapshot()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    long_question = " ".join(["describe the upper left lobe"] * 12)  # past the first span bucket
    asks = [(QUESTIONS[0], image, 8), (long_question, None, 40), (QUESTIONS[1], None, 300), (QUESTIONS[3], image, 20)]

    def answers(engine):
        handles = []
        for q, img, n in asks:
            handles.append(engine.submit(Request(encode_question(processor, q, img),
                                                 SamplingConfig(max_new_tokens=n, ignore_eos=True))))
            engine.step()  # each request joins a running batch
        return [h.result().token_ids for h in handles]

    fast = answers(engine)
    d = engine.stats.since(before)
    assert engine.stats.graph_fallbacks == 0  # no capture failed (a failed one logs why)
    assert (d.graph_captures, d.cache_growths, d.cache_allocations, d.graphs_dropped, d.eager_steps) == (0, 0, 0, 0, 0)
    assert d.graph_replays == d.decode_steps > 250
    slow = answers(Engine(model, processor, max_slots=4, max_len=700, cuda_graphs=False, overlap_steps=False))
    assert [len(t) for t in fast] == [len(t) for t in slow] == [n for _, _, n in asks]
    # bf16 random weights: a near-tie can flip under the graph's kernel order, and the answer then
    # diverges (on an H100 the 300-token one did after 33 tokens); the starts must agree.
    assert [t[:16] for t in fast] == [t[:16] for t in slow]

def test_prefill_leaves_cudnn_attention_out_and_answers_as_before():
    """Eager prefill forwards (the model's own, `prefill_graphs=False`) run scaled_dot_product_attention
    without cuDNN's kernel, whose per-shape plans cost 7.8 ms a call on an H100
    (model/attention_kernels.py), and give the tokens of the same engine with cuDNN allowed (near-ties
    aside: the answers' starts). Decode steps, CUDA graphs of fixed shapes, may use it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from medmoe.model import attention_kernels

    model, processor = fused_model("token", "full")
    lengths = [6, 9, 4, 7]

    def engine():
        made = Engine(model, processor, max_slots=4, prefill_graphs=False)
        prefill = made._prefill

        def marked(pieces):
            with record_function("PREFILL"):
                return prefill(pieces)

        made._prefill = marked
        return made

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fast = run(engine(), processor, lengths)
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == "PREFILL"]
    inside = {e.name for e in events if any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans)}
    assert spans and "aten::scaled_dot_product_attention" in inside and "aten::_cudnn_attention_forward" not in inside
    allowed = attention_kernels.VARYING_SHAPE_ATTENTION
    try:
        attention_kernels.VARYING_SHAPE_ATTENTION = ("CUDNN_ATTENTION",) + allowed
        plain = run(engine(), processor, lengths)
    finally:
        attention_kernels.VARYING_SHAPE_ATTENTION = allowed
    assert [r.token_ids[:4] for r in fast] == [r.token_ids[:4] for r in plain]


def test_prefill_graphs_after_warmup_replay_and_answer_as_the_models_own_forward(monkeypatch):
    """Warm-up captures a prefill graph for every (rows, tokens) bucket; image and text prompts,
    cached prefixes and 64-token pieces of prompts joining a running batch then replay them, with no
    capture, and get the answers of the same prefill run eagerly (bf16: graphs need sync-free experts)."""
    from PIL import Image

    from medmoe.engine import prefill_step

    monkeypatch.setattr(prefill_step, "WARMUP_SECONDS", 1e9)  # every bucket, however busy the machine
    model, processor = fused_model("token", "full")
    engine = Engine(model, processor, max_slots=4, max_len=700, prefill_chunk=64)
    step = engine.prefill_step
    assert step is not None and step.cuda_graphs
    engine.warmup()
    assert sorted(step.graphs) == sorted(step.shapes()) and engine.stats.prefill_captures == len(step.shapes())
    before = engine.stats.snapshot()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    long_question = " ".join(["describe the upper left lobe"] * 12)
    asks = [(QUESTIONS[0], image, 8), (long_question, None, 40), (QUESTIONS[1], None, 30), (QUESTIONS[3], image, 20)]

    def answers(engine):
        rounds = []
        for _ in range(2):  # the second round from the prefix cache
            handles = []
            for q, img, n in asks:
                handles.append(engine.submit(Request(encode_question(processor, q, img),
                                                     SamplingConfig(max_new_tokens=n, ignore_eos=True))))
                engine.step()
            rounds.append([h.result().token_ids for h in handles])
        return rounds

    fast = answers(engine)
    d = engine.stats.since(before)
    assert d.prefill_captures == 0 and d.graphs_dropped == 0 and d.prefill_replays == d.prefills > 8
    assert d.reused_tokens > 0
    slow = answers(Engine(model, processor, max_slots=4, max_len=700, prefill_chunk=64, prefill_graphs=True,
                          cuda_graphs=False, overlap_steps=False))
    assert fast == slow


def test_a_warm_engines_iterations_never_wait_for_the_device(monkeypatch):
    """After warm-up, image and text prompts with routing records, cached prefixes, requests joining
    and leaving: no operation synchronizes with the device (torch's sync debug mode), where a copy
    from pageable memory, a scalar write or a routing-record read would wait for every queued
    kernel. Only the hand-out waits, for its step's tokens (an event)."""
    import warnings

    from PIL import Image

    from medmoe.engine import prefill_step

    monkeypatch.setattr(prefill_step, "WARMUP_SECONDS", 1e9)
    model, processor = fused_model("token", "full")
    engine = Engine(model, processor, max_slots=4, max_len=700)
    engine.warmup()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    asks = [(QUESTIONS[0], image, 8), (QUESTIONS[1], None, 30), (QUESTIONS[0], image, 12), (QUESTIONS[3], image, 20)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handles = []
            for q, img, n in asks * 2:
                handles.append(engine.submit(Request(encode_question(processor, q, img),
                                                     SamplingConfig(max_new_tokens=n, ignore_eos=True),
                                                     output_routing=True)))
                engine.step()
            results = [h.result() for h in handles]
        with warnings.catch_warnings(record=True) as control:  # the detector works: a read-back is caught
            warnings.simplefilter("always")
            torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert syncs == []
    assert any("synchroniz" in str(w.message).lower() for w in control)
    assert engine.stats.reused_tokens > 0 and all(r.prompt_routing for r in results)
    assert [len(r.token_ids) for r in results] == [n for _, _, n in asks * 2]


def test_the_towers_graphs_encode_images_as_the_tower_does():
    """Warm-up captures the vision tower per power-of-two batch (tower_graphs.py); a replay gives
    the eager tower's tokens, and prefill forwards with images replay it."""
    from PIL import Image

    model, processor = fused_model("token", "full")
    engine = Engine(model, processor, max_slots=4, max_len=700)
    engine.warmup()
    assert engine.tower is not None and len(engine.tower.graphs) == 3  # 1, 2 and 4 images (4 staging slots)
    size = model.config.vision_config.image_size
    pixels = torch.randn(4, 3, size, size, device="cuda").to(next(model.vision_tower.parameters()).dtype)
    with torch.no_grad():
        torch.testing.assert_close(engine.tower(pixels).clone(), model.encode_images(pixels), rtol=1e-2, atol=1e-2)
    before = engine.stats.snapshot()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    engine.generate([Request(encode_question(processor, QUESTIONS[0], image), SamplingConfig(max_new_tokens=3))])
    assert engine.stats.since(before).tower_replays == 1


def test_prompts_whose_pixels_are_already_on_the_gpu_answer_as_host_pixels():
    """A Python caller may build prompts with pixel_values on the GPU (scripts/profile_speed.py
    does); the engine's pinned host copies must take them as they are."""
    import dataclasses

    from PIL import Image

    from medmoe.engine.transfer import to_device

    on_gpu = torch.arange(6).reshape(3, 2).cuda()
    assert torch.equal(to_device([on_gpu, torch.ones(1, 2, dtype=torch.long)], "cuda").cpu(),
                       torch.cat([torch.arange(6).reshape(3, 2), torch.ones(1, 2, dtype=torch.long)]))
    model, processor = fused_model("token", "full")
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    prompts = [encode_question(processor, q, image) for q in QUESTIONS[:3]]
    moved = [dataclasses.replace(p, pixel_values=p.pixel_values.cuda()) for p in prompts]
    cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    host = Engine(model, processor, max_slots=4).generate([Request(p, cfg) for p in prompts])
    device = Engine(model, processor, max_slots=4).generate([Request(p, cfg) for p in moved])
    assert [r.finish_reason for r in device] == ["length"] * 3
    assert [r.token_ids for r in device] == [r.token_ids for r in host]


def test_a_prefill_graph_beside_decode_graphs_on_two_streams_finishes_and_changes_no_logit(monkeypatch):
    """Each graph owner records on a stream of its own (engine/graph_capture.py), so a prefill graph can
    replay beside decode steps on a second stream (lab run W: recorded on one stream, they hung): both
    finish, and the decode rows' logits are those of the steps replayed alone."""
    from conftest import load_script

    bench = load_script("scripts/lab/overlap_bench.py")

    def stop(code):
        raise AssertionError("the two streams did not finish")

    monkeypatch.setattr(bench.os, "_exit", stop)
    torch.manual_seed(0)
    _, engine = bench.build(torch.device("cuda"), rows=3, prefill_rows=2, prompt=24, smoke=True)
    decode, shape = bench.decode_runner(engine, rows=3)
    prefill = bench.prefill_runner(engine, prefill_rows=2, prompt=24)
    assert engine.step_fn.graphs and engine.prefill_step.graphs
    assert engine.step_fn.recorder.stream is not engine.prefill_step.recorder.stream
    logits = engine.step_fn.graphs[shape][1]
    with torch.no_grad():
        decode()
        torch.cuda.synchronize()
        alone = logits.clone()
        bench.side_by_side(decode, prefill, steps=4, priority=True, repeats=2)
    torch.testing.assert_close(logits, alone, rtol=0, atol=0)
