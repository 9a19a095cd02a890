"""The engine's prefill latencies behind docs/lab/serving-cpu.md, in one process (no server):

    python scripts/lab/prefill_latency.py ttft --model nano --repeats 20 --threads 1
    python scripts/lab/prefill_latency.py itl --model nano --long-tokens 1500 --chunks 0,256 --repeats 2

ttft: time to first token of one request alone (64 random question words, as `medmoe bench --what
serve`), with the prefix cache on and off (Engine(prefix_cache_mb=...)), alternating; the cache
holds earlier requests' prompts, so that each request finds the chat template's start there.
Reported: wall time and the process's CPU time (which other work on a shared machine disturbs
less, with one torch thread), p50 and p90.

itl: inter-token latency of a running stream while a long prompt arrives, with whole-prompt and
chunked prefill (Engine(prefill_chunk=...)), one engine per setting on the background runner (as
`medmoe serve`; prefix cache off, so that the long prompt is prefilled in full every time): a short
question streams 128 tokens; after its 8th token a long text-only question arrives. Reported per
run: the running stream's gaps between tokens from the long prompt's arrival to the stream's end
(p50, p99, max: the longest stall), the gaps while the long prompt is prefilled (how many, p50),
and the long prompt's time to first token. Settings alternate within each repeat.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import torch

from medmoe.bench.serve_load import WORDS, percentile
from medmoe.engine import Engine, Request, encode_question
from medmoe.generation import SamplingConfig
from medmoe.loading import load_for_inference


def long_question(processor, tokens: int) -> str:
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    while len(processor.tokenizer(" ".join(words))["input_ids"]) > tokens:
        words.pop()
    return " ".join(words) + "?"


def one_run(engine, processor, question: str) -> dict:
    times: list[float] = []
    arrived = threading.Event()
    stream = engine.submit(Request(encode_question(processor, "Describe the finding."),
                                   SamplingConfig(max_new_tokens=128, ignore_eos=True),
                                   on_delta=lambda d: (times.append(time.perf_counter()),
                                                       len(times) == 8 and arrived.set())))
    arrived.wait(60)
    first: list[float] = []
    t0 = time.perf_counter()
    long = engine.submit(Request(encode_question(processor, question), SamplingConfig(max_new_tokens=4, ignore_eos=True),
                                 on_delta=lambda d: first.append(time.perf_counter())))
    stream.result(timeout=600)
    long.result(timeout=600)
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:]) if b > t0]
    during = [(b - a) * 1e3 for a, b in zip(times, times[1:]) if b > t0 and a < first[0]]  # the long prefill's
    return {"itl_p50_ms": percentile(gaps, 50), "itl_p99_ms": percentile(gaps, 99), "itl_max_ms": max(gaps),
            "gaps_during_prefill": len(during), "during_p50_ms": percentile(during, 50),
            "long_ttft_ms": (first[0] - t0) * 1e3, "long_prompt_tokens": len(long.request.prompt.input_ids)}


def ttft(model, processor, repeats: int) -> None:
    engines = {mb: Engine(model, processor, max_slots=1, prefix_cache_mb=mb) for mb in (256.0, 0.0)}
    times: dict[float, list[float]] = {mb: [] for mb in engines}
    cpu_times: dict[float, list[float]] = {mb: [] for mb in engines}  # the process's CPU time: less noisy on a shared machine
    cfg = SamplingConfig(max_new_tokens=1, ignore_eos=True)
    for engine in engines.values():
        engine.warmup()
    for i in range(repeats):
        text = " ".join(random.Random(i).choice(WORDS) for _ in range(64)) + "?"
        for mb, engine in engines.items():
            request = Request(encode_question(processor, text), cfg)
            start, cpu = time.perf_counter(), time.process_time()
            engine.generate([request])
            times[mb].append((time.perf_counter() - start) * 1e3)
            cpu_times[mb].append((time.process_time() - cpu) * 1e3)
    for mb, engine in engines.items():
        row = {"prefix_cache_mb": mb, "requests": repeats, "ttft_p50_ms": percentile(times[mb], 50),
               "ttft_p90_ms": percentile(times[mb], 90), "cpu_p50_ms": percentile(cpu_times[mb], 50),
               "cpu_p90_ms": percentile(cpu_times[mb], 90), "prompt_tokens": len(request.prompt.input_ids),
               "prefilled_tokens": engine.stats.prefill_tokens, "reused_tokens": engine.stats.reused_tokens}
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def itl(model, processor, long_tokens: int, chunks: list[int], repeats: int) -> None:
    question = long_question(processor, long_tokens)
    engines = {}
    for chunk in chunks:
        engines[chunk] = Engine(model, processor, max_slots=8, prefill_chunk=chunk, prefix_cache_mb=0)
        engines[chunk].warmup()
    for repeat in range(repeats):
        for chunk, engine in engines.items():
            engine.start()
            try:
                row = {"prefill_chunk": chunk, "repeat": repeat, **one_run(engine, processor, question)}
            finally:
                engine.stop()
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ttft", "itl"])
    p.add_argument("--model", default="nano")
    p.add_argument("--long-tokens", type=int, default=1500)
    p.add_argument("--chunks", default="0,256", help="itl: prefill_chunk settings, a comma list (0: whole prompts)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1: CPU time close to the work done)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_for_inference(args.model, args.device)
    if args.what == "ttft":
        ttft(model, processor, args.repeats)
    else:
        itl(model, processor, args.long_tokens, [int(c) for c in args.chunks.split(",")], args.repeats)


if __name__ == "__main__":
    main()
