"""The engine's prefix cache across requests and its chunked prefill (engine/prefix_cache.py,
engine/scheduler.py) give the reference loop's answers (generation/generate.py), and a prefix
found in the cache is not prefilled again."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medmoe.engine import Engine
from medmoe.engine.prefix_cache import PrefixCache, image_digest, prompt_key
from medmoe.generation import SamplingConfig
from test_engine import QUESTIONS, assert_same, images, moe_model, reference, request

CFG = SamplingConfig(max_new_tokens=6, ignore_eos=True)
RED, BLUE = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (40, 30), (10, 90, 200))


@pytest.fixture(scope="module")
def phi():
    torch.manual_seed(0)
    return moe_model()


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_alone(engine, req):
    """One request through the engine; returns (result, prompt tokens prefilled, tokens reused)."""
    prefilled, reused = engine.stats.prefill_tokens, engine.stats.reused_tokens
    result = engine.generate([req])[0]
    return result, engine.stats.prefill_tokens - prefilled, engine.stats.reused_tokens - reused


def test_a_later_request_prefills_only_what_follows_the_cached_prefix(phi):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4)
    first = request(processor, QUESTIONS[0], None, CFG)
    second = request(processor, QUESTIONS[2], None, CFG)
    result, prefilled, reused = run_alone(engine, first)
    assert reused == 0 and prefilled == len(first.prompt.input_ids)  # an empty cache: all of it
    assert_same(result, reference(model, processor, QUESTIONS[0], None, CFG))
    shared = common(first.prompt.input_ids, second.prompt.input_ids)
    assert shared >= 100  # the template's system prompt and the turn marker
    result, prefilled, reused = run_alone(engine, second)
    assert reused == shared and prefilled == len(second.prompt.input_ids) - shared
    assert_same(result, reference(model, processor, QUESTIONS[2], None, CFG))
    # The same prompt again: all but its last token (whose logits give the first answer token).
    result, prefilled, reused = run_alone(engine, request(processor, QUESTIONS[2], None, CFG))
    assert (prefilled, reused) == (1, len(second.prompt.input_ids) - 1)
    assert_same(result, reference(model, processor, QUESTIONS[2], None, CFG))
    off = Engine(model, processor, max_slots=4, prefix_cache_mb=0)
    assert off.prefix_cache is None
    for _ in range(2):
        assert run_alone(off, request(processor, QUESTIONS[2], None, CFG))[2] == 0


def test_an_image_matches_only_the_same_image(phi):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4)
    asked = request(processor, QUESTIONS[0], RED, CFG)
    ids = asked.prompt.input_ids
    last_image = max(i for i, t in enumerate(ids) if t == model.config.image_token_id)
    run_alone(engine, asked)
    result, _, reused = run_alone(engine, request(processor, QUESTIONS[1], RED, CFG))  # same image, new question
    assert reused > last_image
    assert_same(result, reference(model, processor, QUESTIONS[1], RED, CFG))
    result, _, reused = run_alone(engine, request(processor, QUESTIONS[1], BLUE, CFG))  # same size, other pixels
    assert reused == ids.index(model.config.image_token_id)  # up to the image, not into it
    assert_same(result, reference(model, processor, QUESTIONS[1], BLUE, CFG))
    text = request(processor, QUESTIONS[1], None, CFG)
    result, _, reused = run_alone(engine, text)
    assert 0 < reused <= ids.index(model.config.image_token_id)
    assert_same(result, reference(model, processor, QUESTIONS[1], None, CFG))


def test_requests_joining_mid_generation_with_cached_prefixes(phi):
    """Many admissions, image and text-only, each joining a running batch with its cached prefix
    (rows of different cached lengths prefilled together), with routing records as without the cache."""
    model, processor = phi
    engine = Engine(model, processor, max_slots=3)
    plain = Engine(model, processor, max_slots=3, prefix_cache_mb=0)
    cases = [(q, i) for q, i in zip(QUESTIONS, images())] * 2 + [(QUESTIONS[1], images()[0])]
    cfgs = [SamplingConfig(max_new_tokens=4 + k % 5, ignore_eos=True) for k in range(len(cases))]
    handles = []
    for (q, i), cfg in zip(cases, cfgs):
        handles.append(engine.submit(request(processor, q, i, cfg, output_routing=True)))
        engine.step()
        engine.step()
    results = [h.result() for h in handles]
    assert engine.stats.reused_tokens > 1000 and engine.stats.largest_batch == 3
    for result, (q, i), cfg in zip(results, cases, cfgs):
        assert_same(result, reference(model, processor, q, i, cfg))
        alone = plain.generate([request(processor, q, i, cfg, output_routing=True)])[0]
        assert len(result.prompt_routing) == len(alone.prompt_routing) > 0
        for x, y in zip(result.prompt_routing, alone.prompt_routing):
            assert torch.equal(x.expert_index, y.expert_index)
            assert torch.allclose(x.probs, y.probs, atol=1e-5)


def test_lora_experts_with_the_prefix_cache():
    model, processor = moe_model("tiny", "token", "lora")
    engine = Engine(model, processor, max_slots=2)
    for q, i in list(zip(QUESTIONS, images())) * 2:
        assert_same(engine.generate([request(processor, q, i, CFG)])[0], reference(model, processor, q, i, CFG))
    assert engine.stats.reused_tokens > 0


@pytest.mark.parametrize("routing", ["pooled", "sample"])
def test_per_sample_routing_never_reuses_a_prefix(routing):
    """The expert of every prompt token depends on the whole prompt: no reuse, no chunks."""
    model, processor = moe_model("tiny-phi", routing)
    engine = Engine(model, processor, max_slots=2, prefill_chunk=8)
    assert engine.prefix_cache is None and engine.prefill_chunk == 0
    for q, i in [(QUESTIONS[0], None), (QUESTIONS[2], None), (QUESTIONS[0], RED)]:
        assert_same(engine.generate([request(processor, q, i, CFG)])[0], reference(model, processor, q, i, CFG))
    assert engine.stats.reused_tokens == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(phi):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4, prefill_chunk=16, prefix_cache_mb=0)
    cfg = SamplingConfig(max_new_tokens=40, ignore_eos=True)
    running = engine.submit(request(processor, QUESTIONS[3], None, cfg))
    engine.step()
    long_question = QUESTIONS[2] * 3
    arriving = engine.submit(request(processor, long_question, RED, CFG))  # image tokens across chunks
    n = len(arriving.request.prompt.input_ids)
    steps, tokens = 0, []
    while engine.prefilling or engine.waiting or engine.incoming:
        before = len(engine.active[0].tokens)
        engine.step()
        tokens.append(len(engine.active[0].tokens) - before)
        steps += 1
    assert steps == -(-n // 16) and all(t == 1 for t in tokens)  # the running stream got a token every step
    assert_same(running.result(), reference(model, processor, QUESTIONS[3], None, cfg))
    assert_same(arriving.result(), reference(model, processor, long_question, RED, CFG))
    # Nothing decoding: the prompt goes in whole, in one step.
    assert not engine.active
    whole = engine.submit(request(processor, long_question, None, CFG))
    engine.step()
    assert not engine.prefilling and len(engine.active) == 1
    assert_same(whole.result(), reference(model, processor, long_question, None, CFG))


def test_chunks_after_a_cached_prefix_and_beside_other_prompts(phi):
    model, processor = phi
    engine = Engine(model, processor, max_slots=4, prefill_chunk=24)
    # The system prompt into the cache, with routing records (which the requests below ask for).
    engine.generate([request(processor, QUESTIONS[0], None, CFG, output_routing=True)])
    cfg = SamplingConfig(max_new_tokens=30, ignore_eos=True)
    running = engine.submit(request(processor, QUESTIONS[3], None, cfg))
    engine.step()
    cases = [(QUESTIONS[2] * 2, BLUE), (QUESTIONS[1], None), (QUESTIONS[0], RED)]
    handles = [engine.submit(request(processor, q, i, CFG, output_routing=True)) for q, i in cases]
    for handle, (q, i) in zip(handles, cases):
        assert_same(handle.result(), reference(model, processor, q, i, CFG))
    assert_same(running.result(), reference(model, processor, QUESTIONS[3], None, cfg))
    assert engine.stats.reused_tokens >= 4 * 100
    # A cached prefix without routing records is not reused by a request that wants them.
    before = engine.stats.reused_tokens
    engine.generate([request(processor, "zz there", None, CFG)])
    engine.generate([request(processor, "zz where", None, CFG, output_routing=True)])  # not "zz "
    assert engine.stats.reused_tokens - before == 2 * 161


def test_the_cache_stays_within_its_bytes_and_keeps_the_shared_start():
    kv = lambda n: torch.randn(2, 3, 2, n, 4)  # [2, layers, kv heads, tokens, head dim]
    per_token = kv(1).numel() * 4
    cache = PrefixCache(max_bytes=100 * per_token)
    system = tuple(range(1000, 1040))
    for i in range(30):
        key = system + (i,) * 20
        cache.insert(key, kv(len(key)))
        assert cache.bytes <= cache.max_bytes
        hit = cache.match(system + (999,), 41)
        assert hit.length == 40 and hit.kv.shape[3] == 40
    assert cache.evicted > 0 and cache.bytes == sum(n.bytes for n in cache.nodes)
    assert cache.match(system + (29,) * 20, 59).length == 59  # the latest prompt is still there
    assert cache.match(system + (0,) * 20, 60).length == 40  # the first one gone, its start kept
    # A stored prompt's keys and values come back as they went in, across a split.
    full = kv(6)
    cache.insert((1, 2, 3, 4, 5, 6), full)
    cache.insert((1, 2, 3, 9), kv(4))
    hit = cache.match((1, 2, 3, 4, 5, 7), 6)
    assert hit.length == 5 and torch.equal(hit.kv, full[..., :5, :])
    # A prompt larger than the cache: its start is kept, within the bound.
    cache.insert(tuple(range(5000, 5400)), kv(400))
    assert cache.bytes <= cache.max_bytes and cache.match(tuple(range(5000, 5010)), 10).length == 10


def test_shrinking_keeps_the_shared_start_and_gives_the_rest_back():
    """What an idle CPU server does: the prompts' own tails go, the system prompt every prompt
    shares stays (it was used whenever any of them was)."""
    kv = lambda n: torch.randn(2, 3, 2, n, 4)
    per_token = kv(1).numel() * 4
    cache = PrefixCache(max_bytes=1000 * per_token)
    system = tuple(range(1000, 1040))
    for i in range(10):
        cache.insert(system + (i,) * 20, kv(60))
    assert cache.bytes == (40 + 10 * 20) * per_token
    cache.shrink(50 * per_token)
    assert cache.bytes <= 50 * per_token and cache.bytes == sum(n.bytes for n in cache.nodes)
    assert cache.match(system + (9,) * 20, 60).length == 40  # the start kept, the tails gone
    cache.shrink(0)
    assert cache.bytes == 0 and cache.match(system + (1,), 41).length == 0


def test_prompt_keys_name_images_by_their_pixels():
    pixels = torch.rand(2, 3, 4, 4)
    ids = [1, 2, 7, 7, 3, 7, 7, 4]
    key = prompt_key(ids, pixels, 7)
    assert key[:2] == (1, 2) and key[2][1] == 0 and key[3][1] == 1 and key[2][0] != key[5][0]
    assert prompt_key(ids, pixels.clone(), 7) == key
    assert prompt_key(ids, pixels, 7, tuple(image_digest(p) for p in pixels)) == key  # digests made ahead (eval)
    other = pixels.clone()
    other[1, 0, 0, 0] += 1
    assert prompt_key(ids, other, 7)[:5] == key[:5] and prompt_key(ids, other, 7)[5] != key[5]
    assert prompt_key(ids, pixels[:1], 7) is not None and prompt_key(ids + [7], pixels, 7) is None
    assert prompt_key(ids, None, 7) is None and prompt_key([1, 2], None, 7) == (1, 2)


def test_one_prefill_of_prompts_with_and_without_cached_prefixes(phi):
    """Rows with cached prefixes of different lengths and a row without one, prefilled together."""
    model, processor = phi
    engine = Engine(model, processor, max_slots=4)
    engine.generate([request(processor, QUESTIONS[0], RED, CFG), request(processor, QUESTIONS[2], None, CFG)])
    alone = SamplingConfig(max_new_tokens=6, ignore_eos=True, share_prefix=False)
    cases = [(QUESTIONS[1], RED, CFG), (QUESTIONS[2], None, alone), (QUESTIONS[2] + "?", None, CFG)]
    reused, prefilled = engine.stats.reused_tokens, engine.stats.prefill_tokens
    batches, original = [], engine._prefill_pieces
    engine._prefill_pieces = lambda pieces: batches.append([(job.done, n) for job, n in pieces]) or original(pieces)
    results = engine.generate([request(processor, q, i, c) for q, i, c in cases])
    assert len(batches) == 1 and batches[0][1][0] == 0 and min(batches[0][0][0], batches[0][2][0]) > 161
    assert engine.stats.reused_tokens - reused > 2 * 161
    lengths = [len(request(processor, q, i, c).prompt.input_ids) for q, i, c in cases]
    assert engine.stats.prefill_tokens - prefilled == sum(lengths) - (engine.stats.reused_tokens - reused)
    for result, (q, i, c) in zip(results, cases):
        assert_same(result, reference(model, processor, q, i, c))


@pytest.mark.parametrize("padded", [False, True], ids=["cpu-batch", "gpu-batch"])
def test_images_of_one_prefill_go_through_the_tower_together(phi, monkeypatch, padded):
    """Prompts with images after a cached system prompt: one tower forward for the prefill's images
    (not one a request), the reference loop's answers, mixed with a text-only prompt; on a GPU the
    batch is padded to a power of two (prefill_kernels.tower_batch), and the padding changes no answer."""
    from medmoe.engine import scheduler

    model, processor = phi
    if padded:
        monkeypatch.setattr(scheduler, "tower_batch", lambda n, device: 1 << (n - 1).bit_length())
    engine = Engine(model, processor, max_slots=4)
    engine.generate([request(processor, QUESTIONS[2], None, CFG)])  # the system prompt into the cache
    cases = [(QUESTIONS[0], RED), (QUESTIONS[1], BLUE), (QUESTIONS[2], None), (QUESTIONS[1], images()[0])]
    batches, original = [], model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: batches.append(pixels.shape[0]) or original(pixels))
    results = engine.generate([request(processor, q, i, CFG) for q, i in cases])
    assert engine.stats.reused_tokens > 3 * 100  # the pieces path: every prompt after its cached start
    assert batches == [4 if padded else 3]
    for result, (q, i) in zip(results, cases):
        assert_same(result, reference(model, processor, q, i, CFG))


def test_changed_weights_empty_the_cache():
    """A training step or loaded weights change the keys and values of every prefix."""
    model, processor = moe_model("tiny", "token", "full")
    engine = Engine(model, processor, max_slots=2)
    engine.generate([request(processor, QUESTIONS[0], None, CFG)])
    assert engine.prefix_cache.nodes
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight.mul_(1.5)
    result, prefilled, reused = run_alone(engine, request(processor, QUESTIONS[0], None, CFG))
    assert reused == 0 and prefilled == len(request(processor, QUESTIONS[0], None, CFG).prompt.input_ids)
    assert_same(result, reference(model, processor, QUESTIONS[0], None, CFG))
    assert run_alone(engine, request(processor, QUESTIONS[0], None, CFG))[2] > 0  # filled again


def test_a_prompt_that_cannot_be_cached_still_gets_its_answer(phi, monkeypatch, caplog):
    """Keeping a prompt in the prefix cache runs after the next decode step is launched; if it fails
    (no memory for the copy) the request is not failed with it."""
    model, processor = phi
    cfg = SamplingConfig(max_new_tokens=6)
    engine = Engine(model, processor, max_slots=2)

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("no memory for the copy")

    monkeypatch.setattr(engine.prefix_cache, "insert", full)
    result = engine.generate([request(processor, QUESTIONS[0], images()[0], cfg)])[0]
    assert_same(result, reference(model, processor, QUESTIONS[0], images()[0], cfg))
    assert "prefix cache failed" in caplog.text and engine.stats.requests_failed == 0


def test_a_prefill_forward_leaves_out_a_piece_that_would_be_mostly_padding(phi):
    """Every row of a forward pads to its longest piece: three 652-token prompts and a 92-token
    piece of a fourth would compute four full rows (2,608 tokens) for a chunk of 2048, so the
    fourth waits; a piece at least half as long as the longest goes in."""
    from medmoe.engine.request import Handle, Prompt, Request
    from medmoe.engine.scheduler import _Prefilling

    model, processor = phi
    engine = Engine(model, processor, max_slots=8)

    def plan(lengths, chunk, done=()):
        engine.prefilling = [_Prefilling(Handle(Request(Prompt([1] * n), CFG))) for n in lengths]
        for job, d in zip(engine.prefilling, done):
            job.done = d
        return [n for _, n in engine._pieces(chunk)]

    assert plan([652] * 5, 2048) == [652, 652, 652]
    assert plan([652] * 5, 2048, done=[92]) == [560, 652, 652]  # a prompt's rest first; then 184 < 326 left
    assert plan([600, 600, 900], 2048) == [600, 600, 848]  # 848 >= 300: a piece
    assert plan([113, 113, 113], 256) == [113, 113]  # a 30-token piece would pad to a 113-token row
    assert plan([3000, 652], 2048) == [2048]  # a long prompt's first piece fills the chunk
    assert plan([300, 300, 5000], 0) == [300, 300]  # nothing decoding: whole prompts within max_prefill_tokens
    assert plan([5000, 300], 0) == [5000]  # ... the first one whole whatever its length
