"""`medmoe serve` on the engine: concurrent streams with their own settings, OpenAI logprobs, ignore_eos."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from medmoe.generation import SamplingConfig, run_generation


@pytest.fixture(scope="module")
def served():
    import httpx

    from medmoe.model.pretrained import build_model
    from medmoe.serving.server import Limits, create_app, serve_in_thread

    torch.manual_seed(0)
    model, processor = build_model("tiny")
    model.upcycle()
    model.eval()
    app = create_app(model, processor, Limits(max_tokens=32, max_batch=4), model_name="tiny")
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=120) as client:
        yield model, processor, client


def stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_two_concurrent_streams_with_their_own_settings(served):
    model, processor, client = served
    greedy = {"messages": [{"role": "user", "content": "What is shown here?"}], "max_tokens": 12, "ignore_eos": True,
              "logprobs": True, "top_logprobs": 2}
    sampled = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 1.3, "seed": 5,
               "ignore_eos": True}
    out = {}
    threads = [threading.Thread(target=lambda k=k, b=b: out.__setitem__(k, stream(client, b)))
               for k, b in (("greedy", greedy), ("sampled", sampled))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {
        "greedy": run_generation(model, processor, ["What is shown here?"], None,
                                 SamplingConfig(max_new_tokens=12, ignore_eos=True)),
        "sampled": run_generation(model, processor, ["hi"], None,
                                  SamplingConfig(max_new_tokens=20, do_sample=True, temperature=1.3, seed=5,
                                                 ignore_eos=True))}
    for key, chunks in out.items():
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text.strip() == expected[key].texts[0]
        assert chunks[-1]["usage"]["completion_tokens"] == len(expected[key].token_ids[0])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    entries = [e for c in out["greedy"] if c["choices"][0].get("logprobs") for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == 12 and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["logprob"] <= 0 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"]) for e in entries)
    assert not any(c["choices"][0].get("logprobs") for c in out["sampled"])


def test_logprobs_in_a_plain_response_and_bad_values(served):
    _, _, client = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True, "logprobs": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["content"]) == r.json()["usage"]["completion_tokens"] == 4
    assert choice["logprobs"]["content"][0]["top_logprobs"] == []
    assert client.post("/v1/chat/completions", json={**body, "top_logprobs": 50}).status_code == 400
    assert client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": 2}).status_code == 400
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False}).json()
    assert "logprobs" not in plain["choices"][0]
    # The answer's confidence comes with every response: the geometric mean of its tokens' probabilities.
    mean = sum(e["logprob"] for e in choice["logprobs"]["content"]) / 4
    assert plain["confidence"] == pytest.approx(math.exp(mean), rel=1e-3) == r.json()["confidence"]


def test_min_confidence_marks_answers_withheld_in_completions_and_streams(served):
    import httpx

    from medmoe.serving.server import Limits, create_app, serve_in_thread

    model, processor, client = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
    assert "withheld" not in client.post("/v1/chat/completions", json=body).json()  # no threshold set
    for threshold, expected in ((0.0, False), (1.0, True)):  # a random model is never certain
        app = create_app(model, processor, Limits(max_tokens=8, max_batch=2, min_confidence=threshold), model_name="tiny")
        with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=120) as other:
            answer = other.post("/v1/chat/completions", json=body).json()
            assert answer["withheld"] is expected and 0 < answer["confidence"] < 1
            assert answer["choices"][0]["message"]["content"] is not None  # kept: the flag is the verdict
            last = stream(other, {**body, "stream": True})[-1]
            assert last["withheld"] is expected and last["confidence"] == pytest.approx(answer["confidence"], rel=1e-3)


def test_classify_between_the_steps_of_a_running_stream(served):
    """A classification takes the model between two engine steps: the stream beside it is the
    stream alone, token for token."""
    import base64
    import io
    import threading

    from PIL import Image

    _, _, client = served
    body = {"messages": [{"role": "user", "content": "What is shown here?"}], "max_tokens": 24, "ignore_eos": True}
    alone = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 10, 10)).save(png, format="PNG")
    image = {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}
    labels = []
    def classify():
        for _ in range(4):
            r = client.post("/v1/classify", json={"image_url": image, "labels": ["a", "b"]})
            labels.append(r.json()["label"] if r.status_code == 200 else r.text)
    thread = threading.Thread(target=classify)
    thread.start()
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in stream(client, body))
    thread.join()
    assert streamed == alone
    assert len(labels) == 4 and set(labels) <= {"a", "b"}


def test_health_counts_reused_prompt_tokens_and_the_cache_can_be_turned_off(served):
    from medmoe.cli import build_parser
    from medmoe.serving.server import Limits, Worker

    model, processor, client = served
    body = {"messages": [{"role": "user", "content": "Is the heart enlarged?"}], "max_tokens": 3, "ignore_eos": True}
    before = client.get("/health").json()
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    after = client.get("/health").json()
    assert after["prompt_tokens_reused"] - before["prompt_tokens_reused"] > 100  # the second one's prompt, but one
    args = build_parser().parse_args(["serve", "--no-prefix-cache", "--prefill-chunk", "64"])
    assert (args.prefix_cache_mb, args.prefill_chunk) == (0.0, 64)
    worker = Worker(model, processor, Limits(prefix_cache_mb=args.prefix_cache_mb, prefill_chunk=args.prefill_chunk))
    assert worker.engine.prefix_cache is None and worker.engine.prefill_chunk == 64


def test_engine_stats_endpoint_counts_the_requests_it_served(served):
    _, _, client = served
    before = client.get("/v1/engine/stats").json()
    assert before["slots"] == 4 and before["cuda_graphs"] is False and before["stats"]["warmup_s"] > 0
    body = {"messages": [{"role": "user", "content": "Any fracture?"}], "max_tokens": 5, "ignore_eos": True}
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    after = client.get("/v1/engine/stats").json()
    grew = {k: after["stats"][k] - before["stats"][k] for k in ("requests_finished", "tokens_generated", "first_tokens")}
    assert grew == {"requests_finished": 2, "tokens_generated": 10, "first_tokens": 2}
    assert after["stats"]["decode_steps"] >= before["stats"]["decode_steps"] + 8  # 4 steps after each first token
    assert "decode steps" in after["summary"]


def test_engine_stats_split_a_streamed_request_into_front_end_stages(served):
    from medmoe.engine.stats import delta
    from medmoe.serving.front_end_stats import front_end_line

    _, _, client = served
    body = {"messages": [{"role": "user", "content": "Any fracture?"}], "max_tokens": 4, "ignore_eos": True}
    before = client.get("/v1/engine/stats").json()
    stream(client, body)
    after = client.get("/v1/engine/stats").json()
    front, engine = delta(after["front_end"], before["front_end"]), delta(after["stats"], before["stats"])
    assert front["requests"] == 1 and front["first_chunks"] == 1 and engine["first_tokens"] == 1
    # arrival -> first chunk holds the engine's submit -> first token, and the hand-off after it
    assert front["to_first_chunk_s"] >= engine["first_token_s"] > 0
    assert front["to_first_chunk_s"] >= front["handoff_s"] >= 0
    assert min(front["read_s"], front["images_s"]) >= 0 and front["encode_s"] > 0
    assert "arrival to first chunk" in front_end_line(front)
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # not streamed: no first chunk
    last = delta(client.get("/v1/engine/stats").json()["front_end"], after["front_end"])
    assert last["requests"] == 1 and last["first_chunks"] == 0 and last["to_first_chunk_s"] == 0
