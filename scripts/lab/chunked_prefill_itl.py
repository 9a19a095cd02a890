"""Inter-token latency of a running stream while a long prompt arrives, with whole-prompt and
chunked prefill (Engine(prefill_chunk=...); docs/lab/serving-cpu.md).

    python scripts/lab/chunked_prefill_itl.py --model nano --long-tokens 1500 --chunks 0,256 --repeats 2

One engine per setting (the background runner, as `medmoe serve`; prefix cache off, so that the
long prompt is prefilled in full every time): a short question streams 128 tokens; after its 8th
token a long text-only question arrives. Reported per run: the running stream's gaps between
tokens from the long prompt's arrival to the stream's end (p50, p99, max), and the long
prompt's time to first token. Settings alternate within each repeat.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

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
    return {"itl_p50_ms": percentile(gaps, 50), "itl_p99_ms": percentile(gaps, 99), "itl_max_ms": max(gaps),
            "long_ttft_ms": (first[0] - t0) * 1e3, "long_prompt_tokens": len(long.request.prompt.input_ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano")
    p.add_argument("--long-tokens", type=int, default=1500)
    p.add_argument("--chunks", default="0,256", help="prefill_chunk settings, a comma list (0: whole prompts)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    model, processor = load_for_inference(args.model, args.device)
    question = long_question(processor, args.long_tokens)
    engines = {}
    for chunk in (int(c) for c in args.chunks.split(",")):
        engines[chunk] = Engine(model, processor, max_slots=8, prefill_chunk=chunk, prefix_cache_mb=0)
        engines[chunk].warmup()
    rows = []
    for repeat in range(args.repeats):
        for chunk, engine in engines.items():
            engine.start()
            try:
                row = {"prefill_chunk": chunk, "repeat": repeat, **one_run(engine, processor, question)}
            finally:
                engine.stop()
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)


if __name__ == "__main__":
    main()
