"""Where a GPU waited for its host, read off a Chrome trace of `scripts/profile_speed.py` (written
with PROFILE_TRACE=FILE.json.gz):

    python scripts/lab/trace_timeline.py eval-trace.json.gz [RANGE_PREFIX ...]

Prints the window's wall time and the GPU's busy time (the union of its kernels, copies and sets),
then for each host range (record_function names starting with a prefix: engine. and eval. by
default) its calls and host time, and the GPU's idle time while it was the innermost range open,
so the ranges in which the device waited for the host come first. Last, the host's waits for the
device (synchronize and copy calls) by range, and the longest idle gaps.
"""

from __future__ import annotations

import gzip
import json
import sys
from bisect import bisect_right
from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_gaps(busy: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    gaps, cursor = [], start
    for a, b in busy:
        if a > cursor:
            gaps.append((cursor, min(a, end)))
        cursor = max(cursor, b)
        if cursor >= end:
            break
    if cursor < end:
        gaps.append((cursor, end))
    return [(a, b) for a, b in gaps if b > a]


def segments(ranges: list[dict]) -> list[tuple[float, float, str]]:
    """The timeline cut where any range opens or closes, each piece named by the shortest range
    open over it (the innermost, for ranges that nest)."""
    points = sorted({e["ts"] for e in ranges} | {e["ts"] + e["dur"] for e in ranges})
    opened = sorted(ranges, key=lambda e: e["ts"])
    active: list[dict] = []
    pieces, k = [], 0
    for a, b in zip(points, points[1:]):
        while k < len(opened) and opened[k]["ts"] <= a:
            active.append(opened[k])
            k += 1
        active = [e for e in active if e["ts"] + e["dur"] > a]
        if active:
            pieces.append((a, b, min(active, key=lambda e: e["dur"])["name"]))
    return pieces


def charge(pieces: list[tuple[float, float, str]], starts: list[float], a: float, b: float, into: dict) -> None:
    """Add the interval [a, b) to the range of each piece it overlaps, pro rata."""
    k = max(bisect_right(starts, a) - 1, 0)
    covered = 0.0
    while k < len(pieces) and pieces[k][0] < b:
        lo, hi = max(a, pieces[k][0]), min(b, pieces[k][1])
        if hi > lo:
            into[pieces[k][2]] += hi - lo
            covered += hi - lo
        k += 1
    if b - a > covered:
        into["(no range)"] += b - a - covered


def at(pieces: list[tuple[float, float, str]], starts: list[float], t: float) -> str:
    k = bisect_right(starts, t) - 1
    return pieces[k][2] if k >= 0 and pieces[k][0] <= t < pieces[k][1] else "(no range)"


def main(path: str, prefixes: tuple[str, ...] = ("engine.", "eval.")) -> None:
    events = load(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    ranges = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(prefixes)),
                    key=lambda e: e["ts"])
    if not ranges or not gpu:
        print(f"{path}: {len(ranges)} host ranges, {len(gpu)} device events: nothing to compare")
        return
    start = min(e["ts"] for e in ranges)
    end = max(e["ts"] + e["dur"] for e in ranges)
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if e["ts"] + e["dur"] > start and e["ts"] < end])
    busy_us = sum(min(b, end) - max(a, start) for a, b in busy)
    print(f"window {(end - start) / 1e6:.3f} s (first range to last), GPU busy {busy_us / 1e6:.3f} s "
          f"({100 * busy_us / (end - start):.0f}%), {len(gpu)} device events")

    pieces = segments(ranges)
    starts = [p[0] for p in pieces]
    gaps = idle_gaps(busy, start, end)
    idle_by = defaultdict(float)
    for a, b in gaps:
        charge(pieces, starts, a, b, idle_by)
    host = defaultdict(lambda: [0, 0.0])
    for e in ranges:
        host[e["name"]][0] += 1
        host[e["name"]][1] += e["dur"]
    print(f"\n{'range':30s} {'calls':>6s} {'host s':>8s} {'GPU idle s':>11s}")
    for name in sorted(set(host) | set(idle_by), key=lambda n: -idle_by.get(n, 0)):
        calls, dur = host.get(name, (0, 0.0))
        print(f"{name:30s} {calls:6d} {dur / 1e6:8.3f} {idle_by.get(name, 0) / 1e6:11.3f}")

    waits = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "cuda_runtime" and start <= e["ts"] <= end:
            key = (at(pieces, starts, e["ts"]), e["name"])
            waits[key][0] += 1
            waits[key][1] += e["dur"]
    print("\nhost waits and launches (runtime calls) by range:")
    for (name, call), (count, dur) in sorted(waits.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {name:30s} {call:32s} {count:6d} {dur / 1e6:8.3f} s")

    print("\nlongest GPU idle gaps:")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        print(f"  {(b - a) / 1e3:8.2f} ms at +{(a - start) / 1e6:7.3f} s in {at(pieces, starts, (a + b) / 2)}")


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]) or ("engine.", "eval."))
