"""Timing helpers: device events on the GPU, a wall clock on the CPU; medians of repeated calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, min_reps: int = 5,
              max_reps: int = 50, budget_s: float = 0.5) -> float:
    """Median milliseconds of `fn()` after `warmup` calls; repeats until `budget_s` or `max_reps`."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (len(times) < max_reps and spent < budget_s):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, size_mib: int = 1024) -> float:
    """Measured device-memory bandwidth: bytes read + written by a large copy, per second (GB/s)."""
    src = torch.empty(size_mib * 2**20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, min_reps=10, max_reps=20)
    return 2 * src.numel() / (ms / 1e3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, min_reps=10, max_reps=30)
    return 2 * n**3 / (ms / 1e3) / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
