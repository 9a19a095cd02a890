"""Kernel-time profiles behind docs/speed.md's "where the time goes" (torch.profiler, one CUDA GPU).

    python scripts/profile_speed.py moe      # one Phi-2-size MoE layer: 16K tokens fwd+bwd, ours and floor
    python scripts/profile_speed.py train    # one phase-3 training step at Phi-2 size, checkpointing on
    python scripts/profile_speed.py train=selective   # ... with another grad_checkpointing setting (0, 2, selective, activations)
    python scripts/profile_speed.py decode   # 100 compiled batch-1 decode steps, run without the graph
    python scripts/profile_speed.py decode=plain      # ... with separate query, key and value projections
    python scripts/profile_speed.py decode=qkv        # ... fused, but Phi's FFN projections apart from them
    python scripts/profile_speed.py decode-trace=DIR   # graph replays' kernels on each stream, a Chrome trace in DIR
    python scripts/profile_speed.py trace-summary=FILE # what docs/speed.md reads off one of those traces
    python scripts/profile_speed.py prefill=32         # 32 image prompts at once through medmoe serve's engine: prefill only
    python scripts/profile_speed.py prefill=32,eager   # ... with the model's own prefill forward (--no-prefill-graphs)
    python scripts/profile_speed.py serve=32[,4]       # 32 lock-step clients (4 requests each) on medmoe serve's engine, profiled
    python scripts/profile_speed.py eval=DATA[,SPLIT]  # medmoe eval of the bundled model: the engine's parts (host and device)
    python scripts/profile_speed.py matvec   # the one-token expert and dense kernels against cuBLAS (and _grouped_mm)
    python scripts/profile_speed.py cat-callers=activations   # CPU: who calls torch.cat in a training step

Each prints a kernel table (self CUDA time, number of calls); divide by the steps profiled. The
training step also prints its wall time against the sum of its kernel times: where the first is
larger, the GPU waited for the host (Python, the checkpointing policy's dispatch).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from medmoe.bench import moe_layer
from medmoe.bench import train as train_bench
from medmoe.bench.models import image_prompt, phi2_medmoe
from medmoe.bench.timing import median_ms
from medmoe.model.recompute import checkpointing_options
from medmoe.training.recipe import checkpointing_setting

DEVICE = torch.device("cuda")


def export_trace(prof) -> None:
    """With PROFILE_TRACE=FILE.json.gz set, the profile's timeline as a gzipped Chrome trace
    (chrome://tracing, ui.perfetto.dev) of what a timeline question needs: the ranges, the kernels
    and copies, and the host's waits and graph launches (the host's operators left out: they
    would make it hundreds of MB)."""
    import gzip
    import json
    import os
    import tempfile

    path = os.environ.get("PROFILE_TRACE")
    if not path:
        return
    waits = ("Synchronize", "Memcpy", "GraphLaunch", "StreamWaitEvent")
    with tempfile.NamedTemporaryFile(suffix=".json") as raw:
        prof.export_chrome_trace(raw.name)
        with open(raw.name) as f:
            trace = json.load(f)
    kept = ("user_annotation", "gpu_user_annotation", "kernel", "gpu_memcpy", "gpu_memset")
    trace["traceEvents"] = [e for e in trace["traceEvents"]
                            if e.get("cat") in kept or e.get("ph") == "M"
                            or e.get("cat") == "cuda_runtime" and any(w in e.get("name", "") for w in waits)]
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    print(f"trace: {path} ({len(trace['traceEvents'])} events)")


def table(prof, rows: int = 40) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=100)


def moe() -> None:
    block, second = moe_layer.build_layer(DEVICE, torch.bfloat16)
    fns = moe_layer.paths(block, second)
    params = [p for p in list(block.parameters()) + list(second.parameters()) if p.requires_grad]
    x = torch.randn(16384, 2560, device=DEVICE, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    for name in ("ours", "floor"):
        def step(fn=fns[name]):
            for p in params:
                p.grad = None
            fn(x.detach().requires_grad_()).backward(grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"==== {name}: 3 x fwd+bwd at 16,384 tokens\n{table(prof, 25)}")


def train(setting: str = "1") -> None:
    model = phi2_medmoe(DEVICE)
    model.train()
    mode, every = checkpointing_setting(setting)
    if mode != "off":
        model.gradient_checkpointing_enable(**checkpointing_options(mode, every))
    optimizer = torch.optim.AdamW(train_bench.phase3_parameters(model), lr=1e-5, fused=True)
    ids, mask, pixels = image_prompt(model, 16, 64, DEVICE, seed=1)
    labels = ids.clone()
    labels[:, : ids.shape[1] - 64] = -100

    def step():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    wall = median_ms(step, DEVICE)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"==== one training step, batch 16 x 640, grad_checkpointing={setting}: {wall:.1f} ms wall, "
          f"{kernels_ms:.1f} ms of kernels\n{table(prof)}")


def decode(setting: str = "fused") -> None:
    """`fused`: the query, key and value projections as one product, and Phi's FFN projections
    with them, as `medmoe bench --what decode` runs the step; `qkv`: the first only; `plain`: as
    transformers has them."""
    import medmoe.engine.static_decode as fast
    from medmoe.engine.prepare import prepare

    model = phi2_medmoe(DEVICE)
    if setting != "plain":
        prepare(model, parallel=setting == "fused")
    ids, mask, pixels = image_prompt(model, 1, 64, DEVICE)
    fast.decode(model, ids, mask, pixels, max_new_tokens=16, compile=True)  # compile once

    class Eager:  # replay = run the compiled step, so every kernel shows in the profile
        def __init__(self, step):
            self.replay = step

    fast._capture = Eager
    fast.decode(model, ids, mask, pixels, max_new_tokens=8, compile=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast.decode(model, ids, mask, pixels, max_new_tokens=101, compile=True)
        torch.cuda.synchronize()
    print(f"==== prefill + 100 compiled decode steps, batch 1 ({setting})\n{table(prof, 45)}")
    on_gpu = [e for e in prof.key_averages() if e.self_device_time_total > 0]  # kernels and copies
    print(f"GPU operations: {sum(e.count for e in on_gpu) / 100:.0f} per step, "
          f"{sum(e.self_device_time_total for e in on_gpu) / 100 / 1e3:.3f} ms per step (prefill included)")


def prefill(setting: str = "32") -> None:
    """`prefill=N[,eager]`: N image prompts (about 820 tokens) submitted at once to the engine
    `medmoe serve` builds (its slots and lengths, prepared and warmed up), each answered with one
    token, so the profile holds the prefill forwards alone; `eager`: the model's own prefill
    forward. A first burst warms the kernels; the second, with other prompts, is profiled."""
    count, _, path = setting.partition(",")
    model = phi2_medmoe(DEVICE)
    prefill_profile(model, DEVICE, int(count), eager=path == "eager")


def prefill_profile(model, device: torch.device, count: int, eager: bool = False, text_tokens: int = 240) -> dict:
    from medmoe.engine import Engine, Prompt, Request
    from medmoe.engine.prepare import prepare
    from medmoe.generation.generate import SamplingConfig
    from medmoe.serving.server import GPU_SLOTS, Limits

    prepare(model)  # as load_for_inference does
    limits = Limits()
    engine = Engine(model, None, max_slots=GPU_SLOTS, max_len=limits.max_prompt_tokens + limits.max_tokens,
                    prefill_graphs=False if eager else None)
    engine.warmup()
    sampling = SamplingConfig(max_new_tokens=1, ignore_eos=True)

    def burst(seed: int) -> float:
        ids, _, pixels = image_prompt(model, count, text_tokens, device, seed=seed)  # new images: no cache hits
        handles = [engine.submit(Request(Prompt(ids[row].tolist(), pixels[row:row + 1]), sampling))
                   for row in range(count)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        while not all(h.done for h in handles):
            engine.step()
        sync()
        return time.perf_counter() - t0

    burst(1)
    before = engine.stats.snapshot()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = burst(2)
    counts = engine.stats.since(before)
    averages = prof.key_averages()
    device_s = sum(e.self_device_time_total for e in averages) / 1e6
    path = "the model's own" if eager else "staged"
    tokens = model.config.vision_config.num_tokens + text_tokens
    print(f"==== {count} image prompts of {tokens} tokens, {path} prefill: wall {wall:.3f} s, kernels {device_s:.3f} s; "
          f"{counts.prefills} prefill forwards ({counts.prefill_replays} replayed), "
          f"{counts.prefill_s:.3f} s")
    if device.type == "cuda":
        print(table(prof, 30))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=80))
    export_trace(prof)
    return {"wall_s": wall, "kernels_s": device_s, "prefill_forwards": counts.prefills}


def serve(setting: str = "32") -> None:
    """`serve=N[,R]`: the load of `medmoe bench --what serve --clients N --image` (R requests a
    client, default 4, each sent when the client's previous answer has ended; 128-token answers
    with EOS ignored; the Phi-2-size model) on the engine `medmoe serve` builds, without HTTP, the
    whole run profiled. Prints tokens/s, the engine's summary line and its parts' host and device
    time; with PROFILE_TRACE set, `scripts/lab/trace_timeline.py` then says where the device idled."""
    clients, _, requests = setting.partition(",")
    serve_profile(phi2_medmoe(DEVICE), DEVICE, int(clients), int(requests or 4))


def first_token_timer(sent: float, firsts: list[float]):
    """An on_delta callback that appends the time from `sent` to the request's first delta."""
    seen = False

    def on_delta(delta) -> None:
        nonlocal seen
        if not seen:
            seen = True
            firsts.append(time.perf_counter() - sent)

    return on_delta


def serve_profile(model, device: torch.device, clients: int, requests: int, max_tokens: int = 128,
                  text_tokens: int = 240, slots: int | None = None) -> dict:
    import threading

    from medmoe.bench.serve_load import spread_ms
    from medmoe.engine import Engine, Prompt, Request
    from medmoe.engine.prepare import prepare
    from medmoe.engine.stats import summary_line
    from medmoe.generation.generate import SamplingConfig
    from medmoe.serving.server import GPU_SLOTS, Limits

    prepare(model)  # as load_for_inference does
    limits = Limits()
    engine = Engine(model, None, max_slots=slots or GPU_SLOTS, max_len=limits.max_prompt_tokens + limits.max_tokens)
    engine.warmup()
    sampling = SamplingConfig(max_new_tokens=max_tokens, ignore_eos=True)

    def load(seed: int) -> tuple[float, list[float]]:
        """The clients' requests to the end, the engine stepped in this thread; wall time and each
        request's time to its first token."""
        firsts: list[float] = []
        prompts = []  # a new image each time, on the host as the server's decoder leaves it, made before the clock starts
        for index in range(clients):
            prompts.append([])
            for r in range(requests):
                ids, _, pixels = image_prompt(model, 1, text_tokens, device, seed=seed + 1000 * (index + 1) + r)
                prompts[-1].append(Prompt(ids[0].tolist(), pixels.cpu()))

        def client(index: int) -> None:
            for prompt in prompts[index]:
                done, sent = threading.Event(), time.perf_counter()
                engine.submit(Request(prompt, sampling, on_delta=first_token_timer(sent, firsts),
                                      on_done=lambda *_: done.set()))
                done.wait()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            if not engine.step():
                time.sleep(0.0005)
        return time.perf_counter() - start, firsts

    def report(name: str, wall: float, firsts: list[float], counts) -> None:
        first = spread_ms(firsts)  # the serve bench's percentiles
        print(f"==== {name}: {clients} clients x {requests} requests, {max_tokens}-token answers: {wall:.2f} s, "
              f"{tokens / wall:.1f} tok/s, first token p50 {first['p50']:.0f} ms, p99 {first['p99']:.0f} ms")
        print(summary_line(counts.as_dict()))

    tokens = clients * requests * max_tokens
    before = engine.stats.snapshot()
    wall, firsts = load(seed=0)  # unprofiled: the engine's own speed under this load
    report("unprofiled", wall, firsts, engine.stats.since(before))
    unprofiled = tokens / wall
    before = engine.stats.snapshot()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall, firsts = load(seed=500_000)  # other images: no prefix-cache hits from the first run
    counts = engine.stats.since(before)
    report("profiled", wall, firsts, counts)
    averages = prof.key_averages()
    print(f"{'range':28s} {'calls':>6s} {'host s':>8s} {'device s':>9s}")
    for event in sorted((e for e in averages if e.key.startswith("engine.")), key=lambda e: -e.cpu_time_total):
        print(f"{event.key:28s} {event.count:6d} {event.cpu_time_total / 1e6:8.3f} {event.device_time_total / 1e6:9.3f}")
    if device.type == "cuda":
        print(table(prof, 30))
    export_trace(prof)
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "unprofiled_tokens_per_s": unprofiled,
            "stats": counts.as_dict()}


def eval_profile(setting: str) -> None:
    """`eval=DATA[,SPLIT]`: `medmoe eval` of the bundled model (batch 128, 32 new tokens) on a
    prepared dataset, profiled after a first evaluation of the same questions that warms the
    engine (its prefix cache then emptied, as at a process's start). Prints the engine's parts
    (scheduler.py's record_function ranges: prefill forward, its images and splice, its finish,
    decode launches, hand-outs), their host and device time, then the host's costliest operators."""
    import tempfile

    from medmoe.evaluation.evaluate import EvalSettings, evaluate
    from medmoe.loading import load_for_inference

    data, _, split = setting.partition(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a check of this script
    model, processor = load_for_inference("nano", device)
    with tempfile.TemporaryDirectory() as out:
        def run(name: str) -> float:
            settings = EvalSettings(model="nano", data=data, out=f"{out}/{name}", split=split or "test", batch_size=128,
                                    max_new_tokens=32)
            start = time.perf_counter()
            evaluate(settings, model, processor)
            return time.perf_counter() - start

        run("warm")  # the same questions: the same engine (batch.shared_engine), warm, graphs captured
        from medmoe.engine.batch import _ENGINES

        engine, _ = _ENGINES[model]
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()  # else every prompt would come from the cache: no prefill to see
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            wall = run("profiled")
    averages = prof.key_averages()
    print(f"==== medmoe eval of nano on {data} ({split or 'test'}), batch 128: {wall:.2f} s in all (reading the "
          "images and scoring included)")
    print(f"{'range':28s} {'calls':>6s} {'host s':>8s} {'device s':>9s}")
    ranges = (e for e in averages if e.key.startswith(("engine.", "eval.")))
    for event in sorted(ranges, key=lambda e: -e.cpu_time_total):
        print(f"{event.key:28s} {event.count:6d} {event.cpu_time_total / 1e6:8.3f} {event.device_time_total / 1e6:9.3f}")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    export_trace(prof)


def decode_trace(out_dir: str = ".") -> None:
    """Five replays of the compiled batch-1 step's CUDA graph, experts beside the attention and after
    it: each stream's kernels (busy time, count) per step, and the Chrome traces (decode_*.json)."""
    import os

    import medmoe.engine.static_decode as fast
    from medmoe.engine.prepare import prepare, unprepare

    model = phi2_medmoe(DEVICE)
    ids, mask, pixels = image_prompt(model, 1, 64, DEVICE)
    for setting in ("overlap", "serial"):
        prepare(model, overlap_experts=setting == "overlap")
        fast.decode(model, ids, mask, pixels, max_new_tokens=16, compile=True)  # compile once
        capture = fast._capture
        graphs = []
        fast._capture = lambda step: graphs.append(capture(step)) or graphs[-1]
        fast.decode(model, ids, mask, pixels, max_new_tokens=4, compile=True)
        fast._capture = capture
        graph = graphs[-1]
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        path = os.path.join(out_dir, f"decode_{setting}.json")
        prof.export_chrome_trace(path)
        print(f"==== {setting}")
        trace_summary(path, replays=5)
        unprepare(model)


def trace_summary(path: str, replays: int = 5) -> None:
    """What docs/speed.md reads off a decode-trace file: time per replay, each stream's kernels, the
    median layer (one fused input product's start to the next; MoE layers are those in which an
    expert kernel starts) and one layer of each kind kernel by kernel, and the input products', the
    attention's, the experts' and the rotary kernel's durations (median, max, us)."""
    import json
    import statistics

    with open(path) as f:
        kernels = sorted((e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    wall = (max(e["ts"] + e["dur"] for e in kernels) - kernels[0]["ts"]) / replays
    streams = sorted({e["args"].get("stream") for e in kernels})
    print(f"{wall / 1e3:.3f} ms per replay (first kernel to last), {len(kernels) / replays:.0f} kernels; per stream: " + ", ".join(
        f"{s}: {sum(e['args'].get('stream') == s for e in kernels) / replays:.0f} kernels, "
        f"{sum(e['dur'] for e in kernels if e['args'].get('stream') == s) / replays / 1e3:.3f} ms busy" for s in streams))
    products = [e for e in kernels if e["name"].startswith("linear_matvec")]
    widest = max(e["args"]["grid"][0] for e in products)
    starts = [e["ts"] for e in products if e["args"]["grid"][0] == widest]  # the fused input products
    expert_starts = [e["ts"] for e in kernels if e["name"] == "matvec"]
    layers = {"MoE": [], "dense": []}
    for a, b in zip(starts, starts[1:]):
        if b - a < 2 * statistics.median(b - a for a, b in zip(starts, starts[1:])):  # not across replays
            layers["MoE" if any(a <= t < b for t in expert_starts) else "dense"].append(b - a)
    inputs = [e["dur"] for e in products if e["args"]["grid"][0] == widest]
    print(f"fused input products: {statistics.median(inputs):.1f} us median ({len(inputs) / replays:.0f} a replay)")
    print("layers: " + ", ".join(f"{kind} {statistics.median(d):.1f} us ({len(d)})" for kind, d in layers.items() if d))
    # One layer of each kind, kernel by kernel: start and end (us from the input product's start), stream, name.
    for kind in ("MoE", "dense"):
        spans = [(a, b) for a, b in zip(starts, starts[1:]) if b - a in layers[kind]]
        if spans:
            a, b = spans[len(spans) // 2]
            print(f"one {kind} layer, {b - a:.1f} us:")
            for e in kernels:
                if a <= e["ts"] < b:
                    print(f"  {e['ts'] - a:7.1f} {e['ts'] + e['dur'] - a:7.1f}  s{e['args'].get('stream')}  {e['name'][:90]}")
    for label, match in (("attention", lambda n: n.startswith("cudnn_generated") or "flash" in n),
                         ("its reduction", lambda n: "lean_reduction" in n), ("expert products", lambda n: n == "matvec"),
                         ("rotary embedding and cache write", lambda n: n.startswith("rotary_cache_write"))):
        d = [e["dur"] for e in kernels if match(e["name"])]
        if d:
            print(f"{label}: {statistics.median(d):.1f} us median, {max(d):.1f} max ({len(d) / replays:.0f} a replay)")


def matvec() -> None:
    from medmoe.moe import kernels

    def graphed(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    for k, n in ((2560, 10240), (10240, 2560)):
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(4, k, n, device=DEVICE, dtype=torch.bfloat16) * 0.02
        dense = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
        expert = torch.tensor([2], device=DEVICE)
        offs = torch.tensor([0, 0, 1, 1], device=DEVICE, dtype=torch.int32)
        timings = {
            "cuBLAS on a dense weight": lambda: F.linear(x, dense),
            "_grouped_mm": lambda: torch._grouped_mm(x, w, offs=offs),
            "expert_matvec": lambda: kernels.expert_matvec(x, w, expert),
        }
        for name, fn in timings.items():
            print(f"K {k} N {n}, in a CUDA graph: {name} {median_ms(graphed(fn), DEVICE) * 1e3:.1f} us")
    for key, config in kernels._triton().matvec_tuner.cache.items():
        print(f"expert_matvec's tile for {key}: {config}")

    # The one-row dense kernel against cuBLAS at the fused products' shapes (Phi-2: input [q; k; v;
    # fc1], output [dense | fc2]) and an FFN's: eight weights per graph, so that the time is the
    # weights streaming, not one launch.
    for k, n in ((2560, 17920), (12800, 2560), (2560, 10240)):
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
        for name, fn in (("cuBLAS", F.linear), ("kernels.linear", kernels.linear),
                         ("kernels.linear with a bias", lambda x, w: kernels.linear(x, w, bias))):
            us = median_ms(graphed(lambda fn=fn: [fn(x, w) for w in weights]), DEVICE) * 1e3 / len(weights)
            print(f"K {k} N {n}, 8 weights in a CUDA graph: {name} {us:.1f} us per product, "
                  f"{n * k * 2 / us / 1e6:.2f} TB/s")
    for key, config in kernels._triton().linear_matvec_tuner.cache.items():
        print(f"kernels.linear's tile for {key}: {config}")


def cat_callers(setting: str = "0") -> None:
    """On the CPU, the tiny bench model: each torch.cat of one training step with the transformers or
    medmoe line that called it (the `CatArrayBatchedCopy` kernels of the GPU profile)."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)
    model = phi2_medmoe(torch.device("cpu"), torch.float32, text=tiny)
    model.train()
    mode, every = checkpointing_setting(setting)
    if mode != "off":
        model.gradient_checkpointing_enable(**checkpointing_options(mode, every))
    ids, mask, pixels = image_prompt(model, 2, 6, torch.device("cpu"))
    callers = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default:
                frames = [f for f in traceback.extract_stack() if "transformers" in f.filename or "medmoe" in f.filename]
                callers[" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[-2:])
                        or "autograd (backward)"] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, return_logits=False).loss.backward()
    layers = model.language_model.config.num_hidden_layers
    print(f"==== torch.cat calls in one training step ({layers} layers), grad_checkpointing={setting}")
    for caller, count in callers.most_common():
        print(f"{count:4d}  {caller}")


if __name__ == "__main__":
    sections = {"moe": moe, "train": train, "decode": decode, "decode-trace": decode_trace, "prefill": prefill, "serve": serve, "eval": eval_profile,
                "trace-summary": trace_summary, "matvec": matvec, "cat-callers": cat_callers}
    for arg in sys.argv[1:] or sections:
        name, _, value = arg.partition("=")
        sections[name](*([value] if value else []))
