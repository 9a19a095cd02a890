"""Whether a prefill forward and decode steps overlap on one GPU: what running them side by side (two
CUDA streams) would save against one after the other, at the 32-client serve load's shapes (lab run
T: Phi-2 size, 32 rows decoding over about 880 cached tokens, while three image prompts of about
816 tokens are prefilled). Lab run T spent 4.8 s in decode steps and 2.4 s in prefill forwards,
one after the other; a prefill is bound by arithmetic, a decode step by memory, so side by side
they might share the GPU. This measures how much, before the engine is built for it.

Both run from CUDA graphs of the engine's own steps (engine/decode_step.py, engine/prefill_step.py,
the prefill at its exact shape), so the host's launches do not enter:
  alone       N decode steps; one prefill forward
  sequential  the prefill, then the N steps, on one stream (what the engine does today)
  concurrent  the prefill on a side stream, the N steps on another; with --priority the steps'
              stream has the higher priority (running streams should not wait for new prompts)
gain = sequential / concurrent; `steps_ms` is each decode step's time while they overlap.

    python scripts/lab/overlap_bench.py [--rows 32] [--prefill-rows 3] [--prompt 816] [--steps 4,8,16]
    python scripts/lab/overlap_bench.py --smoke     # a tiny model on the CPU: the steps run, no timing

On the GPU machine: `bash scripts/lab/gpu_engine.sh overlap` (about two minutes, nothing carried).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medmoe.bench.models import phi2_medmoe  # noqa: E402
from medmoe.engine.prepare import prepare  # noqa: E402
from medmoe.engine.scheduler import Engine  # noqa: E402

CONTEXT = 880  # cached tokens of each decoding row (lab run T's mean at 32 clients)


def build(device: torch.device, rows: int, prefill_rows: int, prompt: int, smoke: bool,
          overlap_experts: bool = True):
    if smoke:
        # bf16 on a GPU: the grouped experts (and so the step's CUDA graph) need it
        model = phi2_medmoe(device, torch.float32 if device.type == "cpu" else torch.bfloat16,
                            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=300))
    else:
        model = phi2_medmoe(device)
    prepare(model, overlap_experts=overlap_experts)
    engine = Engine(model, None, max_slots=rows, max_len=max(CONTEXT, prompt) + 128,
                    max_prefill_tokens=prefill_rows * prompt, prefix_cache_mb=0, prefill_graphs=True,
                    admit_batch=max(prefill_rows, 1))
    engine._allocate_at_bound()  # the cache at its bound, as warm-up leaves it
    return model, engine


def decode_runner(engine: Engine, rows: int):
    """The decode step at (rows, span of CONTEXT), its graph captured; returns a function running one step."""
    step = engine.step_fn
    shape = step.shape(rows, CONTEXT)
    with torch.no_grad():
        step.warm_up([shape])  # its eager warm-up steps, then the capture
    if shape in step.graphs:
        return step.graphs[shape][0].replay, shape
    return (lambda: step._guarded(*shape)), shape


def prefill_runner(engine: Engine, prefill_rows: int, prompt: int):
    """One prefill forward of `prefill_rows` prompts of `prompt` tokens into staging slots, at its exact
    shape (as the engine runs a Phi-2-size forward of several image prompts), as a CUDA graph on a GPU."""
    prefill = engine.prefill_step
    cache = engine.cache
    hidden = prefill.hidden
    g = torch.Generator().manual_seed(0)
    pieces = [(cache.slots + r, 0, (torch.randn(prompt, hidden, generator=g) * 0.02).to(cache.device, cache.dtype))
              for r in range(prefill_rows)]
    shape = (prefill_rows, prompt, prompt)
    inputs = prefill._fill(pieces, *shape)
    with torch.no_grad():
        for _ in range(3):
            prefill._run(shape, inputs, capture=True)
            if shape in prefill.graphs:
                break
    if shape in prefill.graphs:
        return prefill.graphs[shape][0].replay
    return lambda: prefill._run(shape, inputs, capture=False)


def timed(fn, repeats: int = 5) -> float:
    """Median ms of fn() on the GPU, by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def wait_or_report(events: dict, seconds: float = 20.0) -> None:
    """Wait for every event; a GPU that does not finish them in `seconds` hangs (lab run W: two graphs
    side by side never finished), so say which stream is stuck and stop the process."""
    deadline = time.monotonic() + seconds
    while not all(e.query() for e in events.values()):
        if time.monotonic() > deadline:
            state = ", ".join(f"{name} {'done' if e.query() else 'NOT done'}" for name, e in events.items())
            print(f"hung after {seconds:.0f} s: {state}", flush=True)
            os._exit(3)  # the stuck GPU work would block any exit path that synchronizes
        time.sleep(0.001)


def side_by_side(decode, prefill, steps: int, priority: bool, repeats: int = 5) -> dict:
    """The prefill on one stream, `steps` decode steps on another, from one start: the time until
    both are done, and until the steps are."""
    main = torch.cuda.current_stream()
    low, high = torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1 if priority else 0)
    both, steps_ms = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        decoded, prefilled = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        low.wait_stream(main)
        high.wait_stream(main)
        with torch.cuda.stream(low):
            prefill()
            prefilled.record(low)
        with torch.cuda.stream(high):
            for _ in range(steps):
                decode()
            decoded.record(high)
        wait_or_report({"decode steps": decoded, "prefill": prefilled})
        both.append(max(start.elapsed_time(decoded), start.elapsed_time(prefilled)))
        steps_ms.append(start.elapsed_time(decoded) / steps)
    middle = len(both) // 2
    return {"ms": sorted(both)[middle], "steps_ms": sorted(steps_ms)[middle]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="decoding rows")
    parser.add_argument("--prefill-rows", type=int, default=3, help="prompts in the prefill forward")
    parser.add_argument("--prompt", type=int, default=816, help="tokens of each prompt")
    parser.add_argument("--steps", default="4,8,16", help="decode steps beside one prefill forward")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: the steps run, no timing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-overlap-experts", action="store_true",
                        help="the routed experts on the main stream (the engine's --no-overlap-experts): whether the "
                             "experts' own side stream is what the two graphs wait on")
    parser.add_argument("--stack-after", type=float, default=60.0,
                        help="print every thread's stack each this many seconds (where a run that hangs waits)")
    args = parser.parse_args(argv)
    if args.stack_after > 0:
        faulthandler.dump_traceback_later(args.stack_after, repeat=True)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        args.rows, args.prefill_rows, args.prompt = 3, 2, 24
    torch.manual_seed(0)
    clock = time.perf_counter()
    model, engine = build(device, args.rows, args.prefill_rows, args.prompt, smoke, not args.no_overlap_experts)
    print(f"model and engine built: {time.perf_counter() - clock:.1f} s", flush=True)
    decode, shape = decode_runner(engine, args.rows)
    print(f"decode step at {shape} ready: {time.perf_counter() - clock:.1f} s", flush=True)
    prefill = prefill_runner(engine, args.prefill_rows, args.prompt)
    print(f"prefill forward ready: {time.perf_counter() - clock:.1f} s", flush=True)
    report = {"device": torch.cuda.get_device_name() if not smoke else "cpu", "torch": torch.__version__,
              "rows": args.rows, "decode_shape": list(shape), "prefill_rows": args.prefill_rows,
              "prompt": args.prompt, "overlap_experts": not args.no_overlap_experts,
              "graphs": {"decode": bool(engine.step_fn.graphs),
                                                "prefill": bool(engine.prefill_step.graphs)}}
    if smoke:
        with torch.no_grad():
            decode()
            prefill()
        report["cases"] = []
        print(json.dumps(report))
    else:
        report["cases"] = measure(decode, prefill, [int(s) for s in args.steps.split(",")])
    faulthandler.cancel_dump_traceback_later()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


def measure(decode, prefill, step_counts: list[int]) -> list[dict]:
    with torch.no_grad():
        step_ms = timed(lambda: [decode() for _ in range(10)]) / 10
        prefill_ms = timed(prefill)
        print(f"alone: decode step {step_ms:.2f} ms, prefill forward {prefill_ms:.2f} ms", flush=True)
        print(f"{'steps':>5} {'sequential':>11} {'concurrent':>11} {'gain':>6} {'step ms':>8}  "
              f"{'with priority':>14} {'gain':>6} {'step ms':>8}")
        cases = []
        for steps in step_counts:
            def sequential():
                prefill()
                for _ in range(steps):
                    decode()
            print(f"{steps} steps: sequential", flush=True)
            seq = timed(sequential)
            print(f"{steps} steps: side by side", flush=True)
            plain, ranked = side_by_side(decode, prefill, steps, False), side_by_side(decode, prefill, steps, True)
            cases.append({"steps": steps, "decode_step_ms": step_ms, "prefill_ms": prefill_ms, "sequential_ms": seq,
                          "concurrent": plain, "concurrent_priority": ranked,
                          "gain": seq / plain["ms"], "gain_priority": seq / ranked["ms"]})
            print(f"{steps:>5} {seq:>9.2f}ms {plain['ms']:>9.2f}ms {seq / plain['ms']:>6.2f} "
                  f"{plain['steps_ms']:>8.2f}  {ranked['ms']:>12.2f}ms {seq / ranked['ms']:>6.2f} "
                  f"{ranked['steps_ms']:>8.2f}", flush=True)
    return cases


if __name__ == "__main__":
    main()
