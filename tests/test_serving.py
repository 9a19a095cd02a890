"""The Python API, `medmoe ask` / `chat`, the HTTP server (shape, streaming, limits, security) and int8."""

from __future__ import annotations

import base64
import copy
import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from medmoe.config import MODALITIES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny upcycled (Med-MoE) model folder, as `medmoe train` would leave it."""
    from medmoe.model.pretrained import build_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_moe")
    model, processor = build_model("tiny")
    model.upcycle()
    model.save_pretrained(str(d))
    processor.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def medmoe(model_dir):
    from medmoe import MedMoE

    return MedMoE.load(model_dir, max_new_tokens=4)


def picture(colour=(200, 30, 30), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- Python API ---------------------------------------------------------------------------------

def test_importing_medmoe_does_not_import_the_server():
    import subprocess
    import sys

    code = "import sys, medmoe; assert 'medmoe.serving.api' not in sys.modules; assert 'fastapi' not in sys.modules; medmoe.MedMoE"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ask_returns_text_and_the_routing_of_the_image(medmoe):
    answer = medmoe.ask(picture(), "Which modality is this?")
    assert isinstance(answer.text, str) and answer.completion_tokens <= 4
    r = answer.routing
    assert r.expert in MODALITIES and set(r.shares) == set(MODALITIES)
    assert abs(sum(r.shares.values()) - 1.0) < 1e-6
    assert r.image_tokens == medmoe.processor.num_image_tokens
    assert [l["layer"] for l in r.layers] == [b.layer_idx for b in medmoe.model.moe_blocks]
    assert answer.to_dict()["routing"]["expert"] == r.expert


def test_routing_summary_counts_top1_experts_over_image_tokens(medmoe):
    """The summary equals counting the router's top-1 choice at image positions by hand."""
    model, processor = medmoe.model, medmoe.processor
    image = picture((10, 200, 90))
    answer = medmoe.ask(image, "What is shown?", max_new_tokens=1)
    batch = processor(["What is shown?"], [image])
    out = model(**{k: v for k, v in batch.items() if v is not None}, output_routing=True)
    image_pos = batch["input_ids"][0] == model.config.image_token_id
    total = Counter()
    for record in out.routing:
        total.update(MODALITIES[i] for i in record.expert_index[0, image_pos, 0].tolist())
    assert answer.routing.expert == total.most_common(1)[0][0]
    n = sum(total.values())
    assert answer.routing.shares == pytest.approx({m: total[m] / n for m in MODALITIES})


def test_ask_batch_is_one_call_and_matches_single_asks(medmoe):
    images = [picture((200, 30, 30)), None, picture((20, 20, 220), (30, 50))]
    questions = ["What modality?", "A text-only question, a bit longer than the others", "Is it normal?"]
    batch = medmoe.ask_batch(images, questions)
    single = [medmoe.ask(i, q) for i, q in zip(images, questions)]
    assert [a.text for a in batch] == [a.text for a in single]
    assert batch[1].routing is None and batch[0].routing is not None


def test_chat_keeps_history_and_streams(medmoe):
    chat = medmoe.chat()
    pieces = list(chat.stream("What is this?", image=picture()))
    first = chat.last
    assert "".join(pieces).strip() == first.text
    second = chat.ask("And where is it?")
    assert len(chat.turns) == 2 and chat.turns[0].answer == first.text
    assert second.routing is not None  # the first turn's image is still in the prompt
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens - 1
    chat.reset()
    assert chat.turns == [] and chat.ask("hello").routing is None


def test_dense_model_has_no_routing(tmp_path):
    from medmoe import MedMoE
    from medmoe.model.pretrained import build_model

    model, processor = build_model("tiny")
    model.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    assert MedMoE.load(str(tmp_path), max_new_tokens=2).ask(picture(), "hi").routing is None


def test_load_errors_are_clear(tmp_path):
    from medmoe import MedMoE
    from medmoe.errors import MedMoEError

    with pytest.raises(MedMoEError, match="not a model folder"):
        MedMoE.load(str(tmp_path / "missing"))
    with pytest.raises(MedMoEError, match="dtype"):
        MedMoE.load(str(tmp_path), dtype="float8")


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_ask_json_and_text(model_dir, tmp_path, capsys):
    from medmoe.cli import main

    path = tmp_path / "x.png"
    picture().save(path)
    assert main(["ask", "--model", model_dir, "--image", str(path), "--json", "--max-new-tokens", "3", "What?"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["routing"]["expert"] in MODALITIES and record["finish_reason"] in ("eos", "stop", "length")
    assert main(["ask", "--model", model_dir, "--image", str(path), "--max-new-tokens", "2", "What?"]) == 0
    assert "expert handled the image" in capsys.readouterr().err


def test_cli_ask_withholds_an_answer_below_min_confidence(model_dir, tmp_path, capsys):
    from medmoe.cli import main

    path = tmp_path / "x.png"
    picture().save(path)
    ask = ["ask", "--model", model_dir, "--image", str(path), "--max-new-tokens", "2", "What?"]
    assert main(ask + ["--min-confidence", "0"]) == 0
    kept = capsys.readouterr()
    assert kept.out.strip() and "confidence:" in kept.err
    assert main(ask + ["--min-confidence", "1"]) == 0  # a random model is never certain
    withheld = capsys.readouterr()
    assert withheld.out == "" and "withheld: the answer" in withheld.err and "below --min-confidence 100%" in withheld.err
    assert main(ask + ["--json", "--min-confidence", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["withheld"] is True and 0 < record["confidence"] < 1


def test_classify_divides_out_the_question_without_the_image(medmoe):
    from medmoe.evaluation.classification import choice_logprobs
    from medmoe.errors import DataError

    labels, question = ["normal", "pneumonia"], "Which class? Options: normal, pneumonia."
    result = medmoe.classify(picture(), labels, question)
    with_image = choice_logprobs(medmoe.model, medmoe.processor, question, picture(), labels).double()
    alone = choice_logprobs(medmoe.model, medmoe.processor, question, None, labels).double()
    expected = (with_image.log_softmax(-1) - alone.log_softmax(-1)).softmax(-1)
    assert [result.probabilities[label] for label in labels] == pytest.approx(expected.tolist(), rel=1e-4)
    assert [result.uncalibrated[label] for label in labels] == pytest.approx(with_image.softmax(-1).tolist(), rel=1e-4)
    assert result.label == labels[int(expected.argmax())] and result.question == question
    plain = medmoe.classify(picture(), labels, question, calibrate=False)
    assert plain.probabilities == plain.uncalibrated
    assert plain.uncalibrated == pytest.approx(result.uncalibrated)
    with pytest.raises(DataError, match="two distinct labels"):
        medmoe.classify(picture(), ["normal", "normal"])


def test_cli_ask_choices_prints_the_label_and_its_probabilities(model_dir, tmp_path, capsys):
    from medmoe.cli import main

    path = tmp_path / "x.png"
    picture().save(path)
    ask = ["ask", "--model", model_dir, "--image", str(path), "--choices", "normal, pneumonia", "Which class?"]
    assert main(ask) == 0
    out, err = capsys.readouterr()
    assert out.strip() in ("normal", "pneumonia") and "probabilities: normal" in err and "calibrated by" in err
    assert main(ask + ["--json", "--no-calibration", "--min-confidence", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["probabilities"] == record["uncalibrated"] and record["withheld"] is True
    assert sum(record["probabilities"].values()) == pytest.approx(1.0)


def test_cli_ask_dicom_with_window(model_dir, tmp_path, capsys):
    from test_medical_images import hu_phantom, write_dicom

    from medmoe.cli import main

    path = write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    assert main(["ask", "--model", model_dir, "--image", path, "--window", "lung", "--json", "--max-new-tokens", "2",
                 "Which organ?"]) == 0
    assert json.loads(capsys.readouterr().out)["routing"] is not None
    assert main(["ask", "--model", model_dir, "--image", str(tmp_path / "nope.png"), "q"]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_cli_chat_multi_turn(model_dir, tmp_path, monkeypatch, capsys):
    from medmoe.cli import main

    path = tmp_path / "x.png"
    picture().save(path)
    lines = iter([f"/image {path}", "What is it?", "/image /no/such/file.png", "Tell me more", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.count("medmoe> ") == 2 and "routing:" in err and "/no/such/file.png" in err


def test_cli_chat_refuses_unknown_commands(model_dir, monkeypatch, capsys):
    from medmoe.cli import main
    from medmoe.serving.api import ChatSession

    sent = []
    real_stream = ChatSession.stream
    monkeypatch.setattr(ChatSession, "stream", lambda self, q, *a, **k: sent.append(q) or real_stream(self, q, *a, **k))
    lines = iter(["/bogus", "/imagine a cat", "/image", "//etc is a folder", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "unknown command /bogus; commands: /image PATH, /reset, /quit" in err
    assert "unknown command /imagine;" in err and "usage: /image PATH" in err  # not taken for /image
    assert sent == ["/etc is a folder"]  # "//" sends the line with one "/"


def test_cli_serve_names_the_model_asks_for_a_key_and_warns(model_dir, monkeypatch, capsys):
    import os

    import medmoe.serving.server as server
    from medmoe.cli import main

    apps = []
    monkeypatch.setattr(server, "serve", lambda app, host, port: apps.append(app))
    monkeypatch.delenv("MEDMOE_API_KEY", raising=False)
    assert main(["serve", "--model", model_dir, "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without an API key" in err
    assert apps[-1].state.model_name == os.path.basename(model_dir) and not apps[-1].state.auth
    assert main(["serve", "--model", model_dir, "--host", "0.0.0.0", "--api-key", "k", "--served-model-name", "m"]) == 0
    assert "warning" not in capsys.readouterr().err and apps[-1].state.auth and apps[-1].state.model_name == "m"
    monkeypatch.setenv("MEDMOE_API_KEY", "from-env")
    assert main(["serve", "--model", model_dir, "--host", "::"]) == 0
    assert "warning" not in capsys.readouterr().err and apps[-1].state.auth
    monkeypatch.delenv("MEDMOE_API_KEY")
    assert main(["serve", "--model", model_dir, "--host", "127.0.0.1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_serve_compiles_the_decode_step_on_a_gpu_by_default_and_on_request(model_dir, monkeypatch, capsys):
    import medmoe.serving.server as server
    from medmoe.cli import main

    apps = []
    monkeypatch.setattr(server, "serve", lambda app, host, port: apps.append(app))
    compiled = lambda: apps[-1].state.engine.engine.step_fn.compiled  # noqa: E731 (torch.compile compiles lazily)
    assert main(["serve", "--model", model_dir, "--device", "cpu"]) == 0 and not compiled()  # the CPU's default
    assert "torch.compile" not in capsys.readouterr().err
    assert main(["serve", "--model", model_dir, "--device", "cpu", "--compile"]) == 0 and compiled()
    assert "--no-compile skips it" in capsys.readouterr().err
    monkeypatch.setattr("medmoe.model.pretrained.pick_device", lambda device=None: __import__("torch").device("cuda"))
    monkeypatch.setattr(server, "create_app", lambda *a, **kw: apps.append(kw["compile"]) or _App())
    assert main(["serve", "--model", model_dir]) == 0 and apps[-2] is True  # a GPU's default
    assert main(["serve", "--model", model_dir, "--no-compile"]) == 0 and apps[-2] is False


class _App:  # what `medmoe serve` reads of the app it made
    class state:
        model_name = "m"


# --- HTTP server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(medmoe):
    from fastapi.testclient import TestClient

    from medmoe.serving.server import Limits, create_app

    app = create_app(medmoe.model, medmoe.processor, Limits(max_body_bytes=2_000_000, max_image_pixels=1_000_000,
                                                            max_tokens=16, default_max_tokens=4),
                     model_name="tiny-moe")
    with TestClient(app) as c:
        yield c


def user(*parts):
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") or "://" in p or p.startswith("/")
               else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-moe"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"


def test_completion_shape_and_stream_agree(client):
    messages = user(data_url(picture()), "What modality?")
    r = client.post("/v1/chat/completions", json={"model": "tiny-moe", "messages": messages, "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 4 and body["routing"]["expert"] in MODALITIES
    text = body["choices"][0]["message"]["content"]
    events = []
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 4, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == text
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert chunks[-1]["routing"] == body["routing"]


def test_multi_turn_messages(client):
    messages = [{"role": "system", "content": "ignored"}] + user(data_url(picture()), "What is it?") + [
        {"role": "assistant", "content": "A picture."}, {"role": "user", "content": "Where <image> exactly?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["routing"] is not None  # a typed <image> is plain text


def test_classify_endpoint_gives_the_api_label_and_checks_its_fields(client, medmoe):
    from medmoe.serving.api import classify_image

    labels, question = ["normal", "pneumonia"], "Which class? Options: normal, pneumonia."
    body = {"image_url": {"url": data_url(picture())}, "labels": labels, "question": question}
    r = client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    expected = classify_image(medmoe.model, medmoe.processor, picture(), labels, question)
    assert got["object"] == "classification" and got["label"] == expected.label and "withheld" not in got
    assert got["probabilities"] == pytest.approx(expected.probabilities, rel=1e-4)
    plain = client.post("/v1/classify", json={**body, "calibrate": False}).json()
    assert plain["probabilities"] == pytest.approx(plain["uncalibrated"])
    assert plain["uncalibrated"] == pytest.approx(got["uncalibrated"])
    for change, param in [({"labels": ["one"]}, "labels"), ({"labels": ["a", "a"]}, "labels"),
                          ({"labels": ["a", 3]}, "labels[1]"), ({"question": 5}, "question"),
                          ({"image_url": None}, "image_url"), ({"calibrate": "yes"}, "calibrate")]:
        assert openai_error(client.post("/v1/classify", json={**body, **change}), 400)["param"] == param, change
    assert openai_error(client.post("/v1/classify", json={**body, "model": "other"}), 404)["code"] == "model_not_found"


def test_dicom_upload_and_preview(client, tmp_path):
    from test_medical_images import hu_phantom, write_dicom

    data = open(write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024), "rb").read()
    url = "data:application/dicom;base64," + base64.b64encode(data).decode()
    preview = client.post("/v1/preview", json={"image_url": url, "window": "bone"}).json()
    assert preview["width"] == 48 and preview["window"] == "bone" and preview["data_url"].startswith("data:image/png")
    part = {"type": "image_url", "image_url": {"url": url, "window": "rgb"}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert r.status_code == 200


def test_an_error_quoting_a_lone_surrogate_is_still_json():
    from medmoe.serving.http_errors import HTTPProblem

    response = HTTPProblem(400, "unknown window '\ud800'", param="window").response()  # as a decoder may quote it
    assert json.loads(response.body)["error"]["message"] == "unknown window '\\ud800'"


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x.png", "https://example.org/a.png", "file:///etc/passwd",
                                 "/etc/passwd", "ftp://host/x"])
def test_never_opens_urls_or_server_paths(client, url, monkeypatch):
    import builtins

    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    r = client.post("/v1/chat/completions", json={"messages": user(url, "What?") if "://" in url else
                                                  [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert r.status_code == 400
    assert "never fetches URLs or opens server-side paths" in r.json()["error"]["message"]
    assert "/etc/passwd" not in [str(f) for f in opened]


@pytest.mark.parametrize("body,status,fragment", [
    ({"messages": []}, 400, "non-empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "follow a user"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "limit of 16"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n must be 1"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "unsupported role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"junk" * 20).decode()}}]}]}, 400, "not a readable image"),
])
def test_bad_requests_are_400_with_a_reason(client, body, status, fragment):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"]


def test_size_limits(client):
    huge = data_url(Image.new("L", (2000, 1000)))  # 2 Mpx > 1 Mpx limit, small PNG
    r = client.post("/v1/chat/completions", json={"messages": user(huge, "q")})
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"{" + b" " * 2_100_000 + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "must be JSON" in r.json()["error"]["message"]


def test_prompt_token_limit(medmoe):
    from fastapi.testclient import TestClient

    from medmoe.serving.server import Limits, create_app

    from medmoe.data.templates import Turn

    text_only = len(medmoe.processor.encode([Turn("hi")]).input_ids)  # the image adds 16 tokens more
    app = create_app(medmoe.model, medmoe.processor, Limits(max_prompt_tokens=text_only + 4))
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"messages": user(data_url(picture()), "q"), "max_tokens": 2})
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 1}).status_code == 200


def test_an_error_after_the_stream_started_is_an_openai_error_event(medmoe):
    from fastapi.testclient import TestClient

    from medmoe.serving.server import Limits, create_app

    c = TestClient(create_app(medmoe.model, medmoe.processor, Limits(timeout_s=0.2)))  # no worker: it times out
    with c.stream("POST", "/v1/chat/completions", json={"messages": HI, "max_tokens": 1, "stream": True}) as s:
        assert s.status_code == 200
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    error = events[-1]["error"]
    assert set(error) == ERROR_KEYS and error["code"] == "timeout"


def test_queue_full_is_503_and_timeout_is_504(medmoe):
    from fastapi.testclient import TestClient

    from medmoe.serving.server import Limits, create_app

    app = create_app(medmoe.model, medmoe.processor, Limits(queue_size=1, timeout_s=0.5))
    c = TestClient(app)  # not entered: no worker thread, so requests stay queued
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    first = c.post("/v1/chat/completions", json=body)
    assert first.status_code == 504 and first.json()["error"]["type"] == "timeout"
    second = c.post("/v1/chat/completions", json=body)  # the first is still in the queue
    assert second.status_code == 503 and second.headers["retry-after"] == "1"


ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error(r, status: int) -> dict:
    """The error object of a response, checked to be in the OpenAI shape."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"]
    return error


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("field,value,param", [
    ("temperature", "hot", "temperature"), ("top_p", "x", "top_p"), ("seed", "abc", "seed"), ("stop", 5, "stop"),
    ("seed", 2**70, "seed"), ("seed", -1, "seed"), ("seed", True, "seed"), ("seed", 1.5, "seed"),
    ("max_tokens", 0, "max_tokens"), ("max_tokens", True, "max_tokens"), ("max_tokens", 2.0, "max_tokens"),
    ("max_tokens", "4", "max_tokens"), ("max_completion_tokens", -3, "max_completion_tokens"),
    ("temperature", True, "temperature"), ("temperature", 2.5, "temperature"), ("temperature", [1], "temperature"),
    ("top_p", 0, "top_p"), ("top_k", -1, "top_k"), ("n", "1", "n"), ("n", True, "n"), ("n", 2, "n"),
    ("stream", "yes", "stream"), ("stream", 1, "stream"), ("stop", ["a", 3], "stop"), ("stop", ["a"] * 5, "stop"),
    ("stop", [""], "stop"), ("logprobs", "x", "logprobs"), ("logprobs", 1, "logprobs"),
    ("top_logprobs", "x", "top_logprobs"), ("top_logprobs", 3, "top_logprobs"), ("top_logprobs", 21, "top_logprobs"),
    ("ignore_eos", "yes", "ignore_eos"),
    ("presence_penalty", "x", "presence_penalty"), ("frequency_penalty", 1.0, "frequency_penalty"),
    ("logit_bias", {"1": 5}, "logit_bias"), ("tools", [{"type": "function"}], "tools"),
    ("response_format", {"type": "json_object"}, "response_format"), ("user", 5, "user"), ("model", 5, "model"),
    ("stream_options", "x", "stream_options"),
    ("messages", "hi", "messages"), ("messages", {"role": "user"}, "messages"), ("messages", [5], "messages[0]"),
    ("messages", [{"role": 5, "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
    ("messages", [{"role": "user", "content": None}], "messages[0].content"),
    ("messages", [{"role": "user", "content": [5]}], "messages[0].content[0]"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ("messages", [{"role": "user", "content": [{"type": 7}]}], "messages[0].content[0].type"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
     "messages[0].content[0].image_url.url"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "window": 5}}]}],
     "messages[0].content[0].image_url.window"),
    ("messages", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}, {"role": "user", "content": "x"}],
     "messages[1].content"),
    ("messages", [{"role": "user", "content": "\ud800 lone surrogate"}], "messages[0].content"),
])
def test_wrong_types_and_values_are_400_naming_the_field(client, field, value, param):
    body = json.dumps({"messages": HI, "max_tokens": 2, field: value})  # ASCII: a lone surrogate stays escaped
    error = openai_error(client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}),
                         400)
    assert error["param"] == param and error["message"].startswith(param) and error["type"] == "invalid_request_error"


def test_seed_range_and_json_constants(client):
    body = {"messages": HI, "max_tokens": 1, "temperature": 0.7}
    assert client.post("/v1/chat/completions", json={**body, "seed": 2**63 - 1}).status_code == 200
    assert client.post("/v1/chat/completions", json={**body, "seed": 0}).status_code == 200
    openai_error(client.post("/v1/chat/completions", json={**body, "seed": 2**63}), 400)
    # NaN and Infinity are not JSON (Python's parser would take them)
    for raw in (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'):
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert "is not JSON" in openai_error(r, 400)["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "json"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/preview"])
def test_json_endpoints_want_json_content_type(client, path, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content=json.dumps({"messages": HI, "max_tokens": 1}), headers=headers)
    assert openai_error(r, 415)["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_json(client):
    r = client.post("/v1/chat/completions", content=json.dumps({"messages": HI, "max_tokens": 1}),
                    headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200


def test_framework_errors_and_unexpected_500s_are_openai_shaped(client, monkeypatch, caplog):
    import medmoe.serving.server as server

    assert openai_error(client.get("/no/such/page"), 404)["code"] == "not_found"
    assert openai_error(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    assert openai_error(client.put("/v1/models"), 405)["type"] == "invalid_request_error"

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server, "check_model", broken)
    with caplog.at_level("ERROR"):
        error = openai_error(client.post("/v1/chat/completions", json={"messages": HI}), 500)
    assert error["type"] == "server_error" and "a bug" not in error["message"]
    assert "unhandled error" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_framework_422_is_openai_shaped():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from medmoe.serving.http_errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/n")
    def n(count: int):
        return {"count": count}

    error = openai_error(TestClient(app).get("/n?count=many"), 422)
    assert error["param"] == "query.count"


def test_prompt_text_is_capped_in_bytes_before_tokenizing(medmoe, monkeypatch):
    from fastapi.testclient import TestClient

    from medmoe.serving.server import Limits, create_app

    tokenized = []
    encode = medmoe.processor.encode
    monkeypatch.setattr(medmoe.processor, "encode", lambda *a, **k: tokenized.append(a) or encode(*a, **k))
    limits = Limits(max_prompt_tokens=64, timeout_s=0.5)
    assert limits.text_bytes == 1024
    c = TestClient(create_app(medmoe.model, medmoe.processor, limits))  # no worker: a queued request would time out
    tokenized.clear()  # the engine's start-up tokenizes its closed answers (engine/confidence.py), no request
    for text in ["x" * 1025, "€" * 400, "y" * 3_000_000]:  # 400 characters but 1,200 bytes
        messages = [{"role": "user", "content": [{"type": "text", "text": text[:10]}, {"type": "text", "text": text}]}]
        error = openai_error(c.post("/v1/chat/completions", json={"messages": messages}), 413)
        assert "over 1,024 bytes" in error["message"] and error["param"] == "messages[0].content[1]"
    history = [{"role": "user", "content": "a" * 600}, {"role": "assistant", "content": "b" * 600}] + HI
    assert openai_error(c.post("/v1/chat/completions", json={"messages": history}), 413)["param"] == "messages[1].content"
    assert tokenized == []
    # Within the byte budget, the text reaches the tokenizer once (in the handler), whose count
    # then refuses it: 1,000 bytes are 1,000 tokens of the byte tokenizer, above 64.
    error = openai_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "é" * 500}]}), 400)
    assert "tokens" in error["message"] and len(tokenized) == 1


def test_model_name_must_be_the_served_one(client, medmoe):
    from fastapi.testclient import TestClient

    from medmoe.serving.server import create_app

    error = openai_error(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HI}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "tiny-moe" in error["message"]
    for name in ("tiny-moe", None):
        assert client.post("/v1/chat/completions", json={"model": name, "messages": HI, "max_tokens": 1}).status_code == 200
    with TestClient(create_app(medmoe.model, medmoe.processor, model_name="m", model_aliases=["alias"])) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "m"
        assert c.post("/v1/chat/completions", json={"model": "alias", "messages": HI, "max_tokens": 1}).status_code == 200
        assert c.post("/v1/chat/completions", json={"model": "tiny-moe", "messages": HI}).status_code == 404


def test_served_name_of_the_bundled_model_matches_the_docs(model_dir):
    import os
    import re

    from medmoe.serving.server import served_model_name

    assert served_model_name("nano") == "medmoe-nano"
    assert served_model_name(model_dir) == os.path.basename(model_dir)
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "serving.md"), encoding="utf-8").read()
    assert set(re.findall(r'model="([^"]+)"', docs)) == {"medmoe-nano"}


def test_api_key(medmoe, monkeypatch):
    from fastapi.testclient import TestClient

    import medmoe.serving.auth as auth
    from medmoe.serving.server import create_app

    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with TestClient(create_app(medmoe.model, medmoe.processor, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret-and-more"}):
            for method, path in (("get", "/v1/models"), ("post", "/v1/chat/completions"), ("post", "/v1/preview"),
                                 ("get", "/v1/anything")):
                r = getattr(c, method)(path, headers=headers)
                assert openai_error(r, 401)["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/").status_code == 200 and c.get("/health").status_code == 200  # the page asks for the key
        key = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=key).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, headers=key).status_code == 200
    assert compared


def test_an_undecodable_image_is_a_400(client, monkeypatch):
    import zlib

    import medmoe.serving.server as server

    def corrupt(*args, **kwargs):
        raise zlib.error("Error -3 while decompressing data: invalid distance too far back")

    monkeypatch.setattr(server, "open_upload", corrupt)
    error = openai_error(client.post("/v1/chat/completions", json={"messages": user(data_url(picture()), "q")}), 400)
    assert "image 1 could not be decoded (error)" in error["message"]


def test_web_page_is_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>medmoe</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, nothing fetched from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]


# --- int8 ---------------------------------------------------------------------------------------

def test_int8_weight_only_is_close_and_smaller(medmoe):
    from medmoe.serving.quantize import Int8Linear, Int8StackedExperts, compare, quantize_int8

    reference = copy.deepcopy(medmoe.model).float()  # auto loads bfloat16 on CPUs with bfloat16 hardware
    quantized = copy.deepcopy(reference)
    sizes = quantize_int8(quantized)
    assert sizes["bytes_after"] < 0.5 * sizes["bytes_before"]
    kinds = {type(m) for m in quantized.modules()}
    assert Int8Linear in kinds and Int8StackedExperts in kinds
    images = [picture((i * 50, 100, 200 - i * 40)) for i in range(4)]
    report = compare(reference, quantized, medmoe.processor, ["What?", "Where?", "Modality?", "Normal?"], images,
                     max_new_tokens=4)
    assert report["kl_divergence"] < 1e-3 and report["top1_agreement"] > 0.9


def test_load_with_int8(model_dir):
    from medmoe import MedMoE
    from medmoe.serving.quantize import Int8Linear

    m = MedMoE.load(model_dir, quantize="int8", max_new_tokens=2)
    assert any(isinstance(x, Int8Linear) for x in m.model.modules())
    assert m.ask(picture(), "q").routing is not None


def test_int8_keeps_the_llm_lora_adapters():
    from medmoe.adapters import LoRALinear
    from medmoe.serving.quantize import Int8Linear

    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Linear(64, 32), rank=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)
    x = torch.randn(8, 64)
    with torch.no_grad():
        exact, base_only = lora(x), torch.nn.functional.linear(x, lora.weight, lora.bias)
        error = (Int8Linear(lora)(x) - exact).abs().max()
    assert error < 0.05 * (exact - base_only).abs().max()  # the adapters' effect survives quantization


def test_the_mailbox_hands_a_burst_of_events_over_in_order_with_one_wake_up():
    """Events posted from the engine's thread reach each request's queue in order; a burst posted
    before the loop runs costs one wake-up of the loop, not one per event."""
    import asyncio
    import threading

    from medmoe.serving.server import Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        box = Mailbox(loop)
        wakeups = []
        call_soon_threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(a) or call_soon_threadsafe(*a)
        queues = [asyncio.Queue(), asyncio.Queue()]
        burst = threading.Thread(target=lambda: [box.post(queues[i % 2], ("text", i)) for i in range(10)])
        burst.start()
        burst.join()  # all ten posted before the loop runs again
        got = [[(await q.get())[1] for _ in range(5)] for q in queues]
        box.post(queues[0], ("done", None))  # after a delivery, the next post wakes the loop again
        assert (await queues[0].get()) == ("done", None)
        return got, len(wakeups)

    got, wakeups = asyncio.run(main())
    assert got == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert wakeups == 2


def test_a_mailbox_whose_loop_is_gone_says_so():
    import asyncio

    from medmoe.serving.server import Mailbox

    loop = asyncio.new_event_loop()
    box = Mailbox(loop)
    loop.close()
    assert box.post(asyncio.Queue(), ("text", 1)) is False
    assert box.posted == []
