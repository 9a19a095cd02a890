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


def test_dicom_upload_and_preview(client, tmp_path):
    from test_medical_images import hu_phantom, write_dicom

    data = open(write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024), "rb").read()
    url = "data:application/dicom;base64," + base64.b64encode(data).decode()
    preview = client.post("/v1/preview", json={"image_url": url, "window": "bone"}).json()
    assert preview["width"] == 48 and preview["window"] == "bone" and preview["data_url"].startswith("data:image/png")
    part = {"type": "image_url", "image_url": {"url": url, "window": "rgb"}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert r.status_code == 200


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


def test_web_page_is_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>medmoe</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, nothing fetched from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]


# --- int8 ---------------------------------------------------------------------------------------

def test_int8_weight_only_is_close_and_smaller(medmoe):
    from medmoe.serving.quantize import Int8Linear, Int8StackedExperts, compare, quantize_int8

    quantized = copy.deepcopy(medmoe.model)
    sizes = quantize_int8(quantized)
    assert sizes["bytes_after"] < 0.5 * sizes["bytes_before"]
    kinds = {type(m) for m in quantized.modules()}
    assert Int8Linear in kinds and Int8StackedExperts in kinds
    images = [picture((i * 50, 100, 200 - i * 40)) for i in range(4)]
    report = compare(medmoe.model, quantized, medmoe.processor, ["What?", "Where?", "Modality?", "Normal?"], images,
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
