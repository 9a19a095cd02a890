"""What the engine did: counters and host seconds by phase, enough to tell where a slow request's
time went (waiting for a slot, prefill, decode steps in graphs or eager, graph captures, cache
growth, the device, the host's per-token work).

The engine keeps one `EngineStats` (`engine.stats`), cumulative from its start, warm-up included
(`warmup_s`, `warmup_captures`). Counting is cheap: integers, and time.perf_counter() around whole
phases; nothing syncs with the device for it. The host-time phases do not overlap: an iteration's
time (`step_s`) is its prefill (with the hand-out of the first tokens, so the prefill's device
time), the launch of its decode step, the wait for a step's tokens (the device time the host did
not hide) and their hand-out, and a little bookkeeping.

    before = engine.stats.snapshot()
    engine.generate(requests)
    print(engine.stats.since(before).summary())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Fields that are not sums: a difference of two snapshots keeps the later value.
_LEVELS = ("largest_batch", "cache_capacity")


@dataclass
class EngineStats:
    requests_admitted: int = 0  # given a slot
    requests_finished: int = 0  # with a result (end of sequence, stop, length)
    requests_cancelled: int = 0  # by their client or their deadline
    requests_failed: int = 0
    queue_wait_s: float = 0.0  # submit -> a slot, summed over admitted requests
    first_token_s: float = 0.0  # submit -> first token handed out, summed over those requests
    first_tokens: int = 0  # requests that got their first token
    request_s: float = 0.0  # submit -> result, summed over finished requests (a client adds its transport to it)
    prefills: int = 0  # prefill forwards (several prompts, or pieces of long ones, each)
    prefill_tokens: int = 0  # prompt tokens run through the model
    reused_tokens: int = 0  # prompt tokens copied from the prefix cache instead
    prefill_s: float = 0.0  # prefill forwards, with the first tokens' hand-out (their device time)
    prefill_replays: int = 0  # prefill forwards replayed from a CUDA graph (prefill_step.py)
    prefill_captures: int = 0  # prefill graphs captured (warm-up included)
    tower_replays: int = 0  # prefill forwards' images encoded by a CUDA graph of the tower (tower_graphs.py)
    tower_captures: int = 0
    decode_steps: int = 0  # = graph_replays + eager_steps
    decode_rows: int = 0  # running requests summed over decode steps (/ decode_steps: the mean batch)
    largest_batch: int = 0
    graph_replays: int = 0
    eager_steps: int = 0  # decode steps run without a graph (always on the CPU; on a GPU before capture)
    graph_captures: int = 0  # decode-step graphs
    capture_s: float = 0.0
    graphs_dropped: int = 0  # captured graphs thrown away (the cache moved, or the compiler failed)
    compile_fallbacks: int = 0  # torch.compile failed on the step: it runs uncompiled from then on
    graph_fallbacks: int = 0  # capturing the step's CUDA graph failed: it runs eagerly from then on
    cache_allocations: int = 0  # the KV buffer (re)allocated
    cache_growths: int = 0  # of those, while it held keys and values (copied; every graph dropped)
    cache_releases: int = 0  # freed while idle (CPU)
    cache_capacity: int = 0  # tokens per slot now
    tokens_generated: int = 0  # handed to requests
    launch_s: float = 0.0  # decode steps launched and their tokens picked (host time; the device runs on)
    device_wait_s: float = 0.0  # waiting for a step's tokens to reach the host
    hand_out_s: float = 0.0  # tokens to requests: detokenising, stop strings, streaming callbacks
    step_s: float = 0.0  # in the engine's iterations (Engine.step)
    idle_s: float = 0.0  # the background runner waiting for work
    warmup_s: float = 0.0
    warmup_captures: int = 0  # graphs captured by warm-up (graph_captures - warmup_captures: in requests)

    def snapshot(self) -> "EngineStats":
        return dataclasses.replace(self)

    def since(self, before: "EngineStats") -> "EngineStats":
        """What happened between `before` (a snapshot) and now."""
        return EngineStats(**delta(self.as_dict(), before.as_dict()))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return summary_line(self.as_dict())


def delta(after: dict, before: dict) -> dict:
    """The difference of two `as_dict()` records (counters and seconds; levels keep `after`'s)."""
    out = {}
    for key, value in after.items():
        if key in _LEVELS or key not in before:
            out[key] = value
        else:
            out[key] = round(value - before[key], 6) if isinstance(value, float) else value - before[key]
    return out


def summary_line(s: dict) -> str:
    """One line of the figures that explain a slow request."""
    steps = s["decode_steps"]
    mean = lambda total, n: total / n if n else 0.0  # noqa: E731
    return (f"engine: {s['requests_finished']} requests ({s['requests_cancelled']} cancelled, {s['requests_failed']} failed), "
            f"queue wait {mean(s['queue_wait_s'], s['requests_admitted']):.3f} s, first token "
            f"{mean(s['first_token_s'], s['first_tokens']):.3f} s, whole {mean(s['request_s'], s['requests_finished']):.3f} s "
            f"a request; prefill {s['prefill_tokens']} tokens in "
            f"{s['prefills']} forwards ({s.get('prefill_replays', 0)} graph replays, {s.get('prefill_captures', 0)} "
            f"captures; tower {s.get('tower_replays', 0)} graph replays), {s['prefill_s']:.2f} s; {steps} decode steps (mean batch "
            f"{mean(s['decode_rows'], steps):.1f}): {s['graph_replays']} graph replays, {s['eager_steps']} eager, "
            f"{s['graph_captures']} captures ({s['warmup_captures']} at warm-up) {s['capture_s']:.2f} s, "
            f"{s['graphs_dropped']} graphs dropped, {s['cache_growths']} cache growths, {s['compile_fallbacks']} "
            f"compile fallbacks, {s['graph_fallbacks']} graph fallbacks; host s: launch {s['launch_s']:.2f}, device wait {s['device_wait_s']:.2f}, hand-out "
            f"{s['hand_out_s']:.2f}, step {s['step_s']:.2f}, idle {s['idle_s']:.2f}, warm-up {s['warmup_s']:.2f}")
