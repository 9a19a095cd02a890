"""A bounded load test on loopback: 32 concurrent clients x 3 requests (plain and streamed) against
the tiny model through a real uvicorn server on 127.0.0.1. No errors, requests were batched, and
the process's memory did not grow without bound. Bounded in count and time; stops by itself."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pytest
import torch
from PIL import Image

CLIENTS, REQUESTS_EACH = 32, 3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def server():
    from medmoe.model.pretrained import build_model
    from medmoe.serving.server import Limits, create_app, serve_in_thread

    model, processor = build_model("tiny")
    model.upcycle()
    app = create_app(model, processor, Limits(max_batch=16, queue_size=64, timeout_s=120, max_tokens=8))
    with serve_in_thread(app) as base:
        yield base


def image_url(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(24, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_client(client, base: str, index: int) -> list[int]:
    statuses = []
    for r in range(REQUESTS_EACH):
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(index * 10 + r)}},
            {"type": "text", "text": f"Question {r} from client {index}?"}]}], "max_tokens": 3}
        if (index + r) % 2:
            body["stream"] = True
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
                lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
                ok = resp.status_code == 200 and lines[-1] == "data: [DONE]" and \
                    all("error" not in json.loads(line[6:]) for line in lines[:-1])
                statuses.append(200 if ok else resp.status_code or 599)
        else:
            resp = await client.post(f"{base}/v1/chat/completions", json=body)
            ok = resp.status_code == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"
            statuses.append(resp.status_code if ok else 598)
    return statuses


async def load(base: str, clients: int) -> list[int]:
    import httpx

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=150, limits=limits) as client:
        results = await asyncio.wait_for(asyncio.gather(*(one_client(client, base, i) for i in range(clients))), 300)
    return [s for r in results for s in r]


def test_many_concurrent_clients_no_errors_bounded_memory(server):
    import httpx

    asyncio.run(load(server, 4))  # warm up: first-call allocations are not growth
    before = rss_bytes()
    statuses = asyncio.run(load(server, CLIENTS))
    after = rss_bytes()
    assert statuses == [200] * (CLIENTS * REQUESTS_EACH)
    health = httpx.get(f"{server}/health").json()
    assert health["largest_batch"] > 1  # concurrent requests were answered together
    assert health["queued"] == 0
    growth_mb = (after - before) / 2**20
    print(f"load: {len(statuses)} requests, {health['batches']} batches, largest {health['largest_batch']}, "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert growth_mb < 300


def test_clients_that_leave_mid_stream_do_not_stall_the_server(server):
    import httpx

    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 8, "stream": True}
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            with client.stream("POST", f"{server}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())  # read one event, then hang up
        r = client.post(f"{server}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200
        assert client.get(f"{server}/health").json()["queued"] == 0
