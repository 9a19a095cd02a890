"""`medmoe bench --what serve`: N concurrent streaming clients against the real server on loopback.

Each client sends R chat completions one after another (`stream: true`, the OpenAI protocol) and
times every server-sent chunk. Answers have a fixed length: each request asks for `max_tokens`
with `ignore_eos: true` (vLLM's option); completion tokens are counted from the final chunk's
`usage`, so an answer that still stops early counts what it produced. Reported per client count:
aggregate tokens/s (completion tokens / wall time), time to first token (TTFT) and inter-token
latency (ITL: the gap between content chunks) at p50 and p99, time per output token (TPOT: a
request's decode time over its tokens after the first), errors by kind, and what the server's
engine did meanwhile (`GET /v1/engine/stats`, the difference over the run: decode steps by graph
replay, eager step or capture, cache growths, host seconds by phase).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

WORDS = ("lung", "heart", "chest", "left", "right", "upper", "lower", "lobe", "lesion", "mass", "bone", "liver",
         "kidney", "brain", "normal", "image", "scan", "shadow", "fluid", "wall")


@dataclass
class Record:
    """One request as the client saw it (times in seconds from the run's start)."""
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks with content
    completion_tokens: int = 0
    prompt_tokens: int = 0
    status: int = 0
    error: str | None = None  # None: a complete answer

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100), linear between order statistics; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread_ms(values) -> dict:
    ms = [v * 1e3 for v in values]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": sum(ms) / len(ms) if ms else None,
            "n": len(ms)}


def png_data_url(seed: int, size: int = 256) -> str:
    """A random-noise PNG (a different image per request: nothing is cached between requests)."""
    from PIL import Image

    pixels = random.Random(seed).randbytes(size * size * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:application/octet-stream;base64," + base64.b64encode(f.read()).decode()


def chat_body(words: int, seed: int, max_tokens: int, image: str | None = None, stream: bool = True) -> dict:
    """A question of `words` medical words (shuffled per seed), with an image when `image` is given."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(words)) + "?"
    content = [{"type": "text", "text": text}]
    if image == "random":
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(seed)}})
    elif image:
        content.insert(0, {"type": "image_url", "image_url": {"url": file_data_url(image)}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,  # model: the served one
            "ignore_eos": True, "temperature": 0, "stream": stream}


async def stream_request(client, base: str, body: dict, t0: float, stop_after_first: bool = False) -> Record:
    """POST a streaming chat completion and time its chunks; never raises."""
    import httpx

    rec = Record(start=time.perf_counter() - t0)
    done = False
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                rec.error = f"http {resp.status_code}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    rec.error = f"stream error {event['error'].get('code')}"
                    continue
                if event["choices"][0]["delta"].get("content"):
                    rec.chunk_times.append(time.perf_counter() - t0)
                    if stop_after_first:
                        rec.error = "disconnected"  # on purpose: the soak's clients that leave mid-stream
                        return rec
                if event.get("usage"):
                    rec.completion_tokens = event["usage"]["completion_tokens"]
                    rec.prompt_tokens = event["usage"]["prompt_tokens"]
        if rec.error is None and not done:
            rec.error = "no [DONE]"
        elif rec.error is None and not rec.completion_tokens:
            rec.error = "no usage"
    except httpx.TimeoutException:
        rec.error = "timeout"
    except httpx.HTTPError as err:
        rec.error = type(err).__name__
    except (ValueError, KeyError, IndexError) as err:  # a chunk that is not the OpenAI shape
        rec.error = f"bad chunk ({type(err).__name__})"
    finally:
        rec.end = time.perf_counter() - t0
    return rec


async def prompt_usage(client, base: str, body: dict) -> int:
    body = {**body, "stream": False, "max_tokens": 1}
    resp = await client.post(f"{base}/v1/chat/completions", json=body)
    if resp.status_code != 200:
        from .servers import ServerError

        raise ServerError(f"the server answered the calibration request with {resp.status_code}: {resp.text[:300]}")
    return resp.json()["usage"]["prompt_tokens"]


async def calibrate_words(client, base: str, text_tokens: int, image: str | None) -> int:
    """How many words make about `text_tokens` prompt tokens under the served model's tokenizer
    (two one-token requests; they also warm the server up)."""
    short = await prompt_usage(client, base, chat_body(1, 0, 1, image))
    long = await prompt_usage(client, base, chat_body(65, 0, 1, image))
    per_word = max((long - short) / 64, 1e-3)
    return max(1, round(text_tokens / per_word))


def summarize(records: list[Record], wall_s: float) -> dict:
    ok = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1)
            for r in ok if r.completion_tokens > 1 and len(r.chunk_times) > 1]
    per_request = [r.completion_tokens for r in ok]
    return {
        "requests": len(records), "requests_ok": len(ok), "errors": len(records) - len(ok),
        "error_kinds": dict(Counter(r.error for r in records if not r.ok)),
        "completion_tokens": tokens, "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "completion_tokens_per_request": {"min": min(per_request, default=0), "max": max(per_request, default=0),
                                          "mean": sum(per_request) / len(per_request) if per_request else 0},
        "prompt_tokens": percentile([r.prompt_tokens for r in ok], 50),
        # Under 0.5, tokens came in bursts (or without text): TTFT and ITL then time bursts, not tokens.
        "chunks_per_token": sum(len(r.chunk_times) for r in ok) / tokens if tokens else None,
        "ttft_ms": spread_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": spread_ms(itl), "tpot_ms": spread_ms(tpot),
        "latency_ms": spread_ms([r.end - r.start for r in ok]),
        "samples_ms": {"ttft": [round(r.ttft * 1e3, 2) for r in ok if r.ttft is not None],
                       "itl": [round(x * 1e3, 2) for x in itl],
                       "latency": [round((r.end - r.start) * 1e3, 2) for r in ok]},
    }


def request_bodies(clients: int, requests_per_client: int, max_tokens: int, words: int,
                   image: str | None = None) -> list[list[dict]]:
    """Each client's request bodies, built before a run's clock starts: a random PNG takes about
    10 ms to encode, and encoding it in the clients' event loop would hold up every other client's
    stream meanwhile."""
    return [[chat_body(words, index * 1000 + r, max_tokens, image) for r in range(requests_per_client)]
            for index in range(clients)]


async def loop_lag(samples: list, period: float = 0.005) -> None:
    """How late the clients' event loop wakes a task that sleeps `period`, until cancelled: while
    the loop is busy with other streams, every client's chunk times are late by as much."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(period)
        samples.append(max(0.0, time.perf_counter() - start - period))


async def drive(base: str, clients: int, requests_per_client: int, max_tokens: int, words: int,
                image: str | None = None, timeout_s: float = 600.0, bodies: list[list[dict]] | None = None) -> dict:
    """`clients` concurrent clients, each sending `requests_per_client` streaming requests in turn
    (`bodies`: request_bodies' for these settings, else built here)."""
    import httpx

    bodies = bodies or request_bodies(clients, requests_per_client, max_tokens, words, image)

    async def client_loop(client, index: int) -> list[Record]:
        return [await stream_request(client, base, body, t0) for body in bodies[index]]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30), limits=limits) as client:
        lag: list[float] = []
        probe = asyncio.create_task(loop_lag(lag))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        wall = time.perf_counter() - t0
        probe.cancel()
    report = summarize([r for rs in results for r in rs], wall)
    report["client_loop_lag_ms"] = spread_ms(lag)
    return {"clients": clients, "requests_per_client": requests_per_client, "max_tokens": max_tokens,
            "load_average_1min": os.getloadavg()[0], **report}  # other work on the machine slows this down


async def engine_stats(base: str) -> dict | None:
    """The server's `GET /v1/engine/stats`, or None where it has none (another server)."""
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.get(f"{base}/v1/engine/stats")
    return resp.json() if resp.status_code == 200 else None


def engine_delta(before: dict | None, after: dict | None, key: str = "stats") -> dict | None:
    """What the engine (`key="stats"`) or the server's front end (`key="front_end"`) did between
    two `engine_stats` answers."""
    from ..engine.stats import delta

    if before is None or after is None or key not in before or key not in after:
        return None
    return delta(after[key], before[key])


async def run_async(base: str, clients: list[int], requests_per_client: int = 4, max_tokens: int = 64,
                    prompt_tokens: int = 64, image: str | None = None, log=print) -> dict:
    import httpx

    from ..engine.stats import summary_line
    from ..serving.front_end_stats import front_end_line

    started = await engine_stats(base)  # the warm-up's graphs and cache
    async with httpx.AsyncClient(timeout=600) as client:
        words = await calibrate_words(client, base, prompt_tokens, image)
        health = (await client.get(f"{base}/health")).json()
    # warm-up: one full-length answer, so that no measured run pays for first-call allocations
    await drive(base, 1, 1, max_tokens, words, image)
    runs = []
    log(HEADER)
    for n in clients:
        bodies = request_bodies(n, requests_per_client, max_tokens, words, image)
        before = await engine_stats(base)  # the engine's idle time then leaves out building the bodies
        run = await drive(base, n, requests_per_client, max_tokens, words, image, bodies=bodies)
        after = await engine_stats(base)
        run["engine"], run["front_end"] = engine_delta(before, after), engine_delta(before, after, "front_end")
        runs.append(run)
        log(row(run))
    for run in runs:
        if run["engine"] is not None:
            log(f"{run['clients']} clients, {summary_line(run['engine'])}")
        if run["front_end"] is not None:
            lag = run["client_loop_lag_ms"]
            log(f"{run['clients']} clients, client TTFT mean {_ms(run['ttft_ms']['mean'])} ms (its event loop late by "
                f"p50 {_ms(lag['p50'])} / p99 {_ms(lag['p99'])} ms); {front_end_line(run['front_end'])}")
    for note in filter(None, map(burst_note, runs)):
        log(note)
    async with httpx.AsyncClient(timeout=60) as client:  # how the server batched the runs' requests
        after = (await client.get(f"{base}/health")).json()
    return {"server": health, "server_after": after, "engine_at_start": started, "engine_after": await engine_stats(base),
            "prompt_words": words, "image": image, "runs": runs}


def run(base: str, clients: list[int], **kwargs) -> dict:
    return asyncio.run(run_async(base, clients, **kwargs))


HEADER = (f"{'clients':>7} {'requests':>8} {'errors':>6} {'tok/req':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}  (ms)")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def row(run: dict) -> str:
    return (f"{run['clients']:>7} {run['requests']:>8} {run['errors']:>6} "
            f"{run['completion_tokens_per_request']['mean']:>7.1f} {run['tokens_per_s']:>8.1f} "
            f"{_ms(run['ttft_ms']['p50']):>9} {_ms(run['ttft_ms']['p99']):>9} "
            f"{_ms(run['itl_ms']['p50']):>8} {_ms(run['itl_ms']['p99']):>8}")


def burst_note(run: dict) -> str | None:
    """A warning when a run's tokens reached the clients in bursts (or without text)."""
    per_token = run.get("chunks_per_token")
    if per_token is None or per_token >= 0.5:
        return None
    return (f"note: {run['clients']} clients: {per_token:.2f} text chunks per token; time to first token and "
            "inter-token latency time bursts of tokens, not single tokens")

