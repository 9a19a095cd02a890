"""`medmoe bench --what soak`: many clients on loopback for a fixed time, some leaving mid-stream,
some sending bad inputs, while the server's resident memory is sampled.

Roles: a `disconnect_fraction` of the clients stream and close the response after the first
content chunk; a `bad_fraction` send malformed requests in turn (invalid JSON, bad base64, wrong
types, oversize bodies, images and prompts, ...) and expect a 4xx; the rest are good clients
(streamed and plain requests, every other one with an image). Every client stops starting
requests after `seconds`; requests in flight then finish (bounded by the client timeout).

Targets: 0 failed good requests; the server's RSS after the load within 10% of its RSS before.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections import Counter

from .serve_load import Record, chat_body, percentile, spread_ms, stream_request
from .servers import rss_mb

OVERSIZE_BODY_BYTES = 33 * 1024 * 1024  # above the server's default 32 MiB body limit
BAD_PAUSE_S = 0.1  # between a bad client's requests: a steady stream of bad inputs, not a flood


def _oversize_png() -> str:
    """A 7000 x 7000 greyscale PNG (49 Mpx, above the 40 Mpx default limit) that is small on the wire."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (7000, 7000), 128).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bad_requests() -> list[tuple[str, dict]]:
    """(kind, httpx request keywords) for each bad input; each should get a 4xx in the OpenAI error shape."""
    ok = [{"role": "user", "content": "What is shown?"}]
    bad_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "What is shown?"}]}
                 for url in ("data:image/png;base64,@@not base64@@", "data:image/png;base64," +
                             base64.b64encode(b"this is not an image").decode(), "http://example.com/x.png",
                             _oversize_png())]
    as_json = {"headers": {"content-type": "application/json"}}
    return [
        ("invalid_json", {"content": b'{"messages": [{"role": "user", "content": "hi"', **as_json}),
        ("bad_base64_image", {"json": {"messages": bad_image[0]}}),
        ("not_an_image", {"json": {"messages": bad_image[1]}}),
        ("url_image", {"json": {"messages": bad_image[2]}}),
        ("oversize_image", {"json": {"messages": bad_image[3]}}),
        ("messages_not_a_list", {"json": {"messages": "hello"}}),
        ("max_tokens_string", {"json": {"messages": ok, "max_tokens": "ten"}}),
        ("temperature_string", {"json": {"messages": ok, "temperature": "hot"}}),
        ("max_tokens_huge", {"json": {"messages": ok, "max_tokens": 10 ** 9}}),
        ("unknown_role", {"json": {"messages": [{"role": "robot", "content": "hi"}]}}),
        ("oversize_prompt", {"json": {"messages": [{"role": "user", "content": "lung " * 20000}]}}),
        ("oversize_body", {"content": b"{" + b" " * OVERSIZE_BODY_BYTES + b"}", **as_json}),
    ]


def roles(clients: int, disconnect_fraction: float, bad_fraction: float) -> list[str]:
    n_disconnect = round(clients * disconnect_fraction)
    n_bad = round(clients * bad_fraction)
    n_good = clients - n_disconnect - n_bad
    if n_good < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--disconnect-fraction {disconnect_fraction} and --bad-fraction {bad_fraction} leave no "
                          f"good client among {clients}; keep their sum below 1")
    return ["good"] * n_good + ["disconnect"] * n_disconnect + ["bad"] * n_bad


async def plain_request(client, base: str, body: dict, t0: float) -> Record:
    import httpx

    rec = Record(start=time.perf_counter() - t0)
    try:
        resp = await client.post(f"{base}/v1/chat/completions", json=body)
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.error = f"http {resp.status_code}"
        else:
            answer = resp.json()
            rec.completion_tokens = answer["usage"]["completion_tokens"]
            if answer["choices"][0]["message"]["role"] != "assistant":
                rec.error = "bad answer"
    except httpx.TimeoutException:
        rec.error = "timeout"
    except httpx.HTTPError as err:
        rec.error = type(err).__name__
    except (ValueError, KeyError, IndexError) as err:
        rec.error = f"bad answer ({type(err).__name__})"
    rec.end = time.perf_counter() - t0
    return rec


async def bad_request(client, base: str, kind: str, request: dict) -> tuple[str, str]:
    """(kind, outcome): the status code, or the exception when the server closed the connection."""
    import httpx

    try:
        resp = await client.post(f"{base}/v1/chat/completions", **request)
    except httpx.HTTPError as err:
        return kind, type(err).__name__
    outcome = str(resp.status_code)
    if 400 <= resp.status_code < 500:
        try:  # a 4xx must carry the OpenAI error shape
            resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            outcome += " (not the OpenAI error shape)"
    return kind, outcome


async def sample_rss(pid: int, samples: list, t0: float, stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        samples.append((round(time.perf_counter() - t0, 3), round(rss_mb(pid), 1)))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def soak_async(base: str, pid: int, clients: int = 64, seconds: float = 60.0, disconnect_fraction: float = 0.1,
                     bad_fraction: float = 0.1, max_tokens: int = 16, idle_s: float = 2.0, settle_s: float = 3.0,
                     sample_every_s: float = 0.5, request_timeout_s: float = 180.0, log=print) -> dict:
    import httpx

    plan = roles(clients, disconnect_fraction, bad_fraction)
    bads = bad_requests()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=30), limits=limits) as client:
        t0 = time.perf_counter()
        # warm-up: every kind of request once, so that first-call allocations are not counted as growth
        await stream_request(client, base, chat_body(8, 0, max_tokens, "random"), t0)
        await plain_request(client, base, chat_body(8, 1, max_tokens, None, stream=False), t0)
        for kind, request in bads:
            await bad_request(client, base, kind, request)
        samples: list = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_rss(pid, samples, t0, stop, sample_every_s))
        await asyncio.sleep(idle_s)
        load_start = time.perf_counter() - t0
        deadline = time.perf_counter() + seconds
        good: list[Record] = []
        disconnects: list[Record] = []
        bad: list[tuple[str, str]] = []

        async def good_client(i: int) -> None:
            r = 0
            while time.perf_counter() < deadline:
                stream, image = r % 2 == 0, "random" if (i + r) % 2 == 0 else None
                body = chat_body(8, i * 100_000 + r, max_tokens, image, stream=stream)
                good.append(await (stream_request if stream else plain_request)(client, base, body, t0))
                r += 1

        async def disconnect_client(i: int) -> None:
            r = 0
            while time.perf_counter() < deadline:
                body = chat_body(8, i * 100_000 + r, max_tokens, "random" if r % 2 else None)
                disconnects.append(await stream_request(client, base, body, t0, stop_after_first=True))
                r += 1

        async def bad_client(i: int) -> None:
            r = i
            while time.perf_counter() < deadline:
                bad.append(await bad_request(client, base, *bads[r % len(bads)]))
                r += 1
                await asyncio.sleep(BAD_PAUSE_S)

        run = {"good": good_client, "disconnect": disconnect_client, "bad": bad_client}
        await asyncio.wait_for(asyncio.gather(*(run[role](i) for i, role in enumerate(plan))),
                               seconds + request_timeout_s + 30)
        load_end = time.perf_counter() - t0
        await asyncio.sleep(settle_s)
        stop.set()
        await sampler
    report = summarize(plan, good, disconnects, bad, samples, load_start, load_end, idle_s, settle_s)
    report.update(load_average_1min=os.getloadavg()[0], seconds=seconds, max_tokens=max_tokens,
                  disconnect_fraction=disconnect_fraction, bad_fraction=bad_fraction)
    log(table(report))
    return report


def summarize(plan, good, disconnects, bad, samples, load_start, load_end, idle_s, settle_s) -> dict:
    before = [mb for t, mb in samples if t < load_start]
    after = [mb for t, mb in samples if t > load_end + settle_s / 2]
    rss_start = percentile(before, 50) or (samples[0][1] if samples else 0.0)
    rss_end = percentile(after, 50) or (samples[-1][1] if samples else 0.0)
    failed_good = [r for r in good if not r.ok]
    unexpected_bad = [(k, o) for k, o in bad if not o.startswith("4") or "not the OpenAI" in o]
    outcomes: dict[str, Counter] = {}
    for kind, outcome in bad:
        outcomes.setdefault(kind, Counter())[outcome] += 1
    statuses = Counter(str(r.status or r.error) for r in good + disconnects) + Counter(o for _, o in bad)
    return {
        "clients": {role: plan.count(role) for role in ("good", "disconnect", "bad")},
        "load_s": load_end - load_start,
        "good": {"requests": len(good), "failed": len(failed_good),
                 "failure_kinds": dict(Counter(r.error for r in failed_good)),
                 "completion_tokens": sum(r.completion_tokens for r in good if r.ok),
                 "latency_ms": spread_ms([r.end - r.start for r in good if r.ok]),
                 "ttft_ms": spread_ms([r.ttft for r in good if r.ok and r.ttft is not None])},
        "disconnect": {"requests": len(disconnects),
                       "left_mid_stream": sum(r.error == "disconnected" for r in disconnects),
                       "finished_first": sum(r.ok for r in disconnects),
                       "other": dict(Counter(r.error for r in disconnects if r.error not in (None, "disconnected")))},
        "bad": {"requests": len(bad), "unexpected": len(unexpected_bad),
                "outcomes": {kind: dict(counts) for kind, counts in outcomes.items()}},
        "statuses": dict(statuses),
        "rss_mb": {"start": rss_start, "peak": max((mb for _, mb in samples), default=0.0), "end": rss_end,
                   "end_over_start": rss_end / rss_start if rss_start else None,
                   "within_10_percent": bool(rss_start) and abs(rss_end - rss_start) <= 0.1 * rss_start},
        "rss_samples": samples, "load_window_s": [load_start, load_end],
        "good_latency_samples_ms": [round((r.end - r.start) * 1e3, 1) for r in good if r.ok],
    }


def table(report: dict) -> str:
    g, d, b, m = report["good"], report["disconnect"], report["bad"], report["rss_mb"]
    p99 = g["latency_ms"]["p99"]
    lines = [
        f"soak: {sum(report['clients'].values())} clients ({report['clients']}) for {report['load_s']:.0f} s",
        f"good requests {g['requests']}, failed {g['failed']} {g['failure_kinds'] or ''}, latency p50 "
        f"{g['latency_ms']['p50'] or 0:.0f} ms p99 {p99 or 0:.0f} ms",
        f"disconnects {d['requests']} (left mid-stream {d['left_mid_stream']}, finished first {d['finished_first']}, "
        f"other {d['other'] or 0})",
        f"bad requests {b['requests']}, unexpected answers {b['unexpected']}",
        f"statuses {json.dumps(report['statuses'])}",
        f"server RSS {m['start']:.0f} MiB before, {m['peak']:.0f} peak, {m['end']:.0f} after "
        f"({(m['end_over_start'] or 0) - 1:+.1%}; within 10%: {m['within_10_percent']})",
    ]
    return "\n".join(lines)


def run(base: str, pid: int, **kwargs) -> dict:
    return asyncio.run(soak_async(base, pid, **kwargs))
