"""The inference engine (medmoe.engine) gives the reference loop's answers (generation/generate.py)
whatever runs beside a request: other lengths, requests joining mid-generation, image and text-only
prompts, per-sample routing, LoRA experts; and its own sampling, stop, length and logprob rules."""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch
from PIL import Image

from medmoe.engine import Engine, Request, encode_question
from medmoe.engine.scheduler import ADMIT_DELAY_STEPS
from medmoe.errors import ConfigError
from medmoe.generation import SamplingConfig, run_generation
from medmoe.model.pretrained import build_model

QUESTIONS = ["What modality is this image?", "Any fracture?", "Describe the finding in detail, please.", "hi"]


def images():
    return [Image.new("RGB", (40, 30), (200, 10, 10)), None, Image.new("RGB", (20, 20), (10, 90, 200)), None]


def moe_model(name="tiny-phi", routing="token", expert_type="full"):
    model, processor = build_model(name)
    model.upcycle({"routing": routing, "expert_type": expert_type, "expert_lora": {"rank": 4, "alpha": 8}})
    for block in model.moe_blocks:  # experts that differ, so that routing matters
        with torch.no_grad():
            for weight in (block.experts.w_in,) if expert_type == "full" else (block.experts.b_in, block.experts.b_out):
                weight.add_(torch.randn_like(weight) * 0.05)
    return model.eval(), processor


def reference(model, processor, question, image, cfg):
    """The plain cached loop, the request alone."""
    out = run_generation(model, processor, [question], [image], cfg)
    return out.token_ids[0], out.texts[0], out.finish_reasons[0]


def request(processor, question, image, cfg, **kwargs):
    return Request(encode_question(processor, question, image), cfg, **kwargs)


def assert_same(result, expected):
    tokens, text, reason = expected
    assert (result.token_ids, result.text, result.finish_reason) == (tokens, text, reason)


@pytest.fixture(params=[False, True], ids=["in-turn", "overlapped"])
def overlap(request):
    """Engine(overlap_steps=...): hand out a step's tokens after launching the next (a GPU's
    default), or at once; the answers are the same."""
    return request.param


@pytest.fixture(scope="module")
def phi():
    torch.manual_seed(0)
    return moe_model()


@pytest.mark.parametrize("name,routing,expert_type", [("tiny-phi", "token", "full"), ("tiny", "token", "lora"),
                                                      ("tiny-phi", "pooled", "full"), ("tiny", "sample", "lora"),
                                                      ("tiny-phi", "pooled", "lora")])
def test_batch_of_image_and_text_prompts_matches_the_reference(name, routing, expert_type):
    model, processor = moe_model(name, routing, expert_type)
    cfg = SamplingConfig(max_new_tokens=10)
    expected = [reference(model, processor, q, i, cfg) for q, i in zip(QUESTIONS, images())]
    results = Engine(model, processor, max_slots=4, overlap_steps=routing == "pooled").generate(
        [request(processor, q, i, cfg) for q, i in zip(QUESTIONS, images())])
    for result, want in zip(results, expected):
        assert_same(result, want)


def test_one_request_and_requests_of_different_lengths(phi):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4)
    lengths = [3, 12, 7, 1]
    cfgs = [SamplingConfig(max_new_tokens=n, ignore_eos=True) for n in lengths]
    results = engine.generate([request(processor, q, i, c) for q, i, c in zip(QUESTIONS, images(), cfgs)])
    assert [r.completion_tokens for r in results] == lengths
    assert all(r.finish_reason == "length" for r in results)
    for result, q, i, c in zip(results, QUESTIONS, images(), cfgs):
        assert_same(result, reference(model, processor, q, i, c))
    single = engine.generate([request(processor, QUESTIONS[0], images()[0], cfgs[1])])[0]
    assert_same(single, reference(model, processor, QUESTIONS[0], images()[0], cfgs[1]))


def test_a_request_joining_mid_generation_gets_the_reference_answer(phi, overlap):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4, overlap_steps=overlap)
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    first = engine.submit(request(processor, QUESTIONS[0], images()[0], cfg))
    for _ in range(4):
        engine.step()
    assert len(engine.active) == 1 and not first.done
    second = engine.submit(request(processor, QUESTIONS[2], None, cfg))
    engine.step()
    assert len(engine.active) == 2  # joined the running batch
    third = engine.submit(request(processor, QUESTIONS[1], images()[2], SamplingConfig(max_new_tokens=3)))
    results = [h.result() for h in (first, second, third)]
    assert_same(results[0], reference(model, processor, QUESTIONS[0], images()[0], cfg))
    assert_same(results[1], reference(model, processor, QUESTIONS[2], None, cfg))
    assert_same(results[2], reference(model, processor, QUESTIONS[1], images()[2], SamplingConfig(max_new_tokens=3)))
    assert engine.stats.largest_batch == 3 and not engine.active


def test_admit_batch_prefills_arrivals_together_within_the_delay_bound(phi, overlap):
    """While requests decode, arrivals wait for `admit_batch` free slots and then share one prefill;
    none waits more than ADMIT_DELAY_STEPS steps for it; every answer is the reference's."""
    model, processor = phi
    assert Engine(model, processor, max_slots=4).admit_batch == 1  # the CPU's default: every step
    with pytest.raises(ConfigError, match="admit_batch"):
        Engine(model, processor, max_slots=4, admit_batch=0)
    engine = Engine(model, processor, max_slots=4, overlap_steps=overlap, admit_batch=4)
    long, short = SamplingConfig(max_new_tokens=40, ignore_eos=True), SamplingConfig(max_new_tokens=3, ignore_eos=True)
    cases = [(QUESTIONS[0], images()[0], long), (QUESTIONS[2], None, short), (QUESTIONS[1], images()[1], short),
             (QUESTIONS[3], None, short)]
    handles = [engine.submit(request(processor, *cases[0]))]
    engine.step()
    assert len(engine.active) == 1  # nothing was decoding: admitted at once
    handles.append(engine.submit(request(processor, *cases[1])))
    steps = 0
    while len(engine.active) < 2:
        engine.step()
        steps += 1
    assert steps == ADMIT_DELAY_STEPS + 1  # 3 slots free, fewer than 4: held back, for at most the bound
    prefills = engine.stats.prefills
    handles.append(engine.submit(request(processor, *cases[2])))
    engine.step()
    handles.append(engine.submit(request(processor, *cases[3])))  # a step later
    while engine.waiting or engine.incoming:
        engine.step()
    assert engine.stats.prefills == prefills + 1  # the two arrivals in one prefill forward (admit_batch=1: two)
    for handle, (q, i, cfg) in zip(handles, cases):
        assert_same(handle.result(), reference(model, processor, q, i, cfg))


def test_the_slots_bound_the_batch_and_a_request_waits_for_one(phi, overlap):
    model, processor = phi
    engine = Engine(model, processor, max_slots=2, overlap_steps=overlap)
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    handles = [engine.submit(request(processor, q, None, cfg)) for q in QUESTIONS[:3]]
    engine.step()
    assert len(engine.active) == 2 and len(engine.waiting) == 1  # no slot for the third yet
    seen = 0
    while not all(h.done for h in handles):
        engine.step()
        seen = max(seen, len(engine.active))
    assert seen <= 2 and engine.stats.largest_batch == 2
    for h, q in zip(handles, QUESTIONS):
        assert_same(h.result(), reference(model, processor, q, None, cfg))


def test_a_request_longer_than_a_slot_is_refused(phi):
    from medmoe.engine import RequestTooLong

    model, processor = phi
    engine = Engine(model, processor, max_len=16)
    with pytest.raises(RequestTooLong, match="max_new_tokens"):
        engine.submit(request(processor, QUESTIONS[2], None, SamplingConfig(max_new_tokens=64)))


def test_stop_strings_max_tokens_and_ignore_eos(phi, monkeypatch, overlap):
    model, processor = phi
    engine = Engine(model, processor, overlap_steps=overlap)
    free = engine.generate([request(processor, QUESTIONS[0], None, SamplingConfig(max_new_tokens=8, ignore_eos=True))])[0]
    assert free.finish_reason == "length" and free.completion_tokens == 8
    # A stop string taken from the middle of the free answer cuts it there.
    stop = free.text[len(free.text) // 2:][:3]
    if stop.strip():
        cfg = SamplingConfig(max_new_tokens=8, stop=(stop,))
        cut = engine.generate([request(processor, QUESTIONS[0], None, cfg)])[0]
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert_same(cut, reference(model, processor, QUESTIONS[0], None, cfg))
    # The first token made an end token: the request ends there, unless ignore_eos.
    end = {free.token_ids[0]}
    monkeypatch.setattr(sys.modules["medmoe.generation.generate"], "eos_ids", lambda m, p: end)
    engine.eos = end
    for ignore in (False, True):
        cfg = SamplingConfig(max_new_tokens=4, ignore_eos=ignore)
        result = engine.generate([request(processor, QUESTIONS[0], None, cfg)])[0]
        assert (result.finish_reason, result.completion_tokens) == (("length", 4) if ignore else ("eos", 0))
        assert_same(result, reference(model, processor, QUESTIONS[0], None, cfg))


def test_seeded_sampling_is_reproducible_and_each_request_has_its_own(phi, overlap):
    model, processor = phi
    engine = Engine(model, processor, overlap_steps=overlap)
    hot = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7,
                         ignore_eos=True)
    other = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.0, seed=3, ignore_eos=True)
    greedy = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    alone = engine.generate([request(processor, QUESTIONS[0], images()[0], hot)])[0]
    mixed = engine.generate([request(processor, QUESTIONS[1], None, greedy),
                             request(processor, QUESTIONS[0], images()[0], hot),
                             request(processor, QUESTIONS[2], None, other)])
    assert mixed[1].token_ids == alone.token_ids
    assert_same(alone, reference(model, processor, QUESTIONS[0], images()[0], hot))
    assert_same(mixed[0], reference(model, processor, QUESTIONS[1], None, greedy))
    assert_same(mixed[2], reference(model, processor, QUESTIONS[2], None, other))


def test_logprobs_are_the_log_softmax_of_the_reference_logits(phi, overlap):
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3)
    result = Engine(model, processor, overlap_steps=overlap).generate([request(processor, QUESTIONS[0], images()[0], cfg)])[0]
    assert len(result.logprobs) == 5
    batch = processor([QUESTIONS[0]], [images()[0]])
    ids = torch.cat([batch["input_ids"], torch.tensor([result.token_ids])], 1)
    with torch.no_grad():  # no cache: the whole sequence at once
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False).logits[0].float()
    prompt = batch["input_ids"].shape[1]
    for i, entry in enumerate(result.logprobs):
        logp = logits[prompt - 1 + i].log_softmax(-1)
        assert entry.token_id == result.token_ids[i] == int(logp.argmax())
        assert entry.logprob == pytest.approx(float(logp[entry.token_id]), abs=1e-4)
        best = logp.topk(3)
        assert [t for t, _, _ in entry.top] == best.indices.tolist()
        assert [p for _, _, p in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.token == processor.tokenizer.decode([entry.token_id])
    # The answer's confidence: the geometric mean of its tokens' probabilities, computed for every
    # request (also without logprobs), from the same distribution.
    mean = sum(e.logprob for e in result.logprobs) / 5
    assert 0 < result.confidence < 1 and result.confidence == pytest.approx(math.exp(mean), rel=1e-4)
    plain = Engine(model, processor, overlap_steps=overlap).generate(
        [request(processor, QUESTIONS[0], images()[0], SamplingConfig(max_new_tokens=5, ignore_eos=True))])[0]
    assert plain.logprobs is None and plain.confidence == pytest.approx(result.confidence, rel=1e-4)


def test_streaming_deltas_add_up_to_the_answer_and_cancel_stops(phi, overlap):
    model, processor = phi
    engine = Engine(model, processor, overlap_steps=overlap)
    handle = engine.submit(request(processor, QUESTIONS[2], images()[0], SamplingConfig(max_new_tokens=12,
                                                                                         ignore_eos=True)))
    deltas = list(handle)
    assert "".join(d.text for d in deltas).strip() == handle.result().text
    assert [t for d in deltas for t in d.token_ids] == handle.result().token_ids
    stopped = engine.submit(request(processor, QUESTIONS[2], None, SamplingConfig(max_new_tokens=50, ignore_eos=True)))
    engine.step()
    stopped.cancel()
    engine.step()
    assert stopped.result().finish_reason == "cancelled" and stopped.result().completion_tokens < 50
    assert not engine.active


def test_prompt_routing_and_the_python_api_through_the_engine(phi):
    from medmoe.serving.api import MedMoE

    model, processor = phi
    m = MedMoE(model, processor, max_new_tokens=6)
    answers = m.ask_batch([images()[0], None], QUESTIONS[:2])
    assert answers[0].routing is not None and answers[0].routing.image_tokens == processor.num_image_tokens
    assert answers[1].routing is None
    assert answers[0].text == reference(model, processor, QUESTIONS[0], images()[0], SamplingConfig(max_new_tokens=6))[1]
    pieces = list(m.stream(images()[0], QUESTIONS[0]))
    assert "".join(pieces).strip() == answers[0].text


def test_the_background_runner_serves_concurrent_submissions(phi, overlap):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4, overlap_steps=overlap)
    engine.start()
    try:
        cfgs = [SamplingConfig(max_new_tokens=n, ignore_eos=True) for n in (6, 3, 9)]
        handles = [engine.submit(request(processor, q, None, c)) for q, c in zip(QUESTIONS, cfgs)]
        results = [h.result(timeout=120) for h in handles]
    finally:
        engine.stop()
    for result, q, c in zip(results, QUESTIONS, cfgs):
        assert_same(result, reference(model, processor, q, None, c))


def test_an_idle_cpu_runner_frees_its_kv_cache_and_serves_again(phi, monkeypatch):
    import medmoe.engine.scheduler as scheduler

    model, processor = phi
    monkeypatch.setattr(scheduler, "IDLE_RELEASE_S", 0.05)
    monkeypatch.setattr(scheduler, "IDLE_PREFIX_KEEP_BYTES", 0)
    engine = Engine(model, processor, max_slots=2)
    cfg = SamplingConfig(max_new_tokens=4, ignore_eos=True)
    engine.start()
    try:
        first = engine.submit(request(processor, QUESTIONS[0], None, cfg)).result(timeout=120)
        deadline = time.monotonic() + 10
        while engine.cache.kv is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.cache.kv is None and engine.cache.capacity == 0  # memory back between bursts
        assert engine.prefix_cache.bytes == 0  # down to what it keeps when idle
        again = engine.submit(request(processor, QUESTIONS[0], None, cfg)).result(timeout=120)
    finally:
        engine.stop()
    assert again.token_ids == first.token_ids and engine.cache.capacity > 0


def test_the_common_start_of_prompts_is_prefilled_once(phi, monkeypatch):
    import medmoe.engine.scheduler as scheduler

    model, processor = phi
    calls = []
    original = scheduler.prefill_shared_prefix
    monkeypatch.setattr(scheduler, "prefill_shared_prefix", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    shared, alone = (SamplingConfig(max_new_tokens=6, ignore_eos=True, share_prefix=share) for share in (True, False))
    results = {cfg.share_prefix: Engine(model, processor, max_slots=4).generate(
        [request(processor, q, i, cfg, output_routing=True) for q, i in zip(QUESTIONS, images())])
        for cfg in (shared, alone)}
    assert len(calls) == 1 and calls[0] >= 8  # one prefill, the system prompt shared
    for a, b, q, i in zip(results[True], results[False], QUESTIONS, images()):
        assert_same(a, reference(model, processor, q, i, alone))
        assert a.token_ids == b.token_ids
        for x, y in zip(a.prompt_routing, b.prompt_routing):
            assert torch.equal(x.expert_index, y.expert_index)


def test_a_bad_prompt_fails_alone_and_zero_new_tokens_is_empty(phi):
    from medmoe.engine import Prompt

    model, processor = phi
    engine = Engine(model, processor)
    cfg = SamplingConfig(max_new_tokens=4, ignore_eos=True)
    good = request(processor, QUESTIONS[0], images()[0], cfg)
    pixels = good.prompt.pixel_values
    bad = Request(Prompt(good.prompt.input_ids, torch.cat([pixels, pixels])), cfg)  # one image too many
    handles = [engine.submit(good), engine.submit(bad)]
    assert_same(handles[0].result(), reference(model, processor, QUESTIONS[0], images()[0], cfg))
    with pytest.raises(ValueError, match="image"):
        handles[1].result()
    empty = engine.generate([request(processor, "hi", None, SamplingConfig(max_new_tokens=0))])[0]
    assert (empty.text, empty.token_ids, empty.finish_reason) == ("", [], "length")
    assert not engine.active


@pytest.mark.parametrize("name,routing,expert_type", [("tiny-phi", "token", "full"), ("tiny-phi", "pooled", "full"),
                                                      ("tiny-phi", "sample", "lora"), ("tiny", "token", "lora")])
def test_a_prepared_model_gives_the_reference_answers(name, routing, expert_type):
    """With the inference modules engine.prepare installs (fused attention and Phi layers, experts
    beside the attention, Phi's one-token attention with a position per row on the slot cache)."""
    from medmoe.engine.prepare import prepare, unprepare

    model, processor = moe_model(name, routing, expert_type)
    cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    expected = [reference(model, processor, q, i, cfg) for q, i in zip(QUESTIONS, images())]
    prepared = prepare(model)
    assert prepared.fused_layers == model.language_model.config.num_hidden_layers
    assert (prepared.decode_attention_layers > 0) == (name == "tiny-phi")
    try:
        results = Engine(model, processor, max_slots=4).generate(
            [request(processor, q, i, cfg) for q, i in zip(QUESTIONS, images())])
    finally:
        unprepare(model)
    for result, want in zip(results, expected):
        assert result.token_ids == want[0]
