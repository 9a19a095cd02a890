"""Where a training step's time goes (`profile_steps`, off by default): torch.profiler over a few
optimizer steps once the loop has warmed up, its tables written to the phase folder.

`profile.txt` holds the wall time per profiled step (the GPU synchronised at both ends of the
window, the profiler's own overhead included), on a GPU the device time per step (its kernels and
copies, summed), the host time of the loop's parts (the data loader's `next`, `forward`,
`backward`, `optimizer`), and the operators' `key_averages` sorted by self device (CUDA) time and
by self CPU time, top 30 each. A step whose host time far exceeds its device time is bound by the host:
the CPU table says where the host spends it.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

PROFILE_FILE = "profile.txt"
WARMUP_STEPS = 3  # steps run before profiling: allocator, autotuning and data-loader workers warmed up
TOP = 30
PARTS = ("data", "forward", "backward", "optimizer")  # the loop's ranges (data: the loader's next)


class StepProfiler:
    """Profiles `steps` optimizer steps after the first WARMUP_STEPS of this run (fewer in a run too
    short for both); `step()` after each optimizer step. A context manager: leaving it (the run's
    end, or an exception) stops the profiler and writes what it recorded. steps=0: does nothing."""

    def __init__(self, steps: int, run_dir: str, device: torch.device, steps_left: int):
        self.steps, self.path, self.device = steps, os.path.join(run_dir, PROFILE_FILE), device
        self.start_after = max(0, min(WARMUP_STEPS, steps_left - steps))
        self.done, self.prof, self.t0 = 0, None, 0.0

    def __enter__(self) -> "StepProfiler":
        if self.steps > 0 and self.start_after == 0:
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        if self.prof is not None:
            self._finish()

    def step(self) -> None:
        if self.steps <= 0:
            return
        self.done += 1
        if self.prof is None and self.done == self.start_after:
            self._start()
        elif self.prof is not None and self.done == self.start_after + self.steps:
            self._finish()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()
        self._sync()
        self.t0 = time.perf_counter()

    def _finish(self) -> None:
        self.steps = 0  # once per run
        self._sync()
        wall = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        profiled = self.done - self.start_after
        try:
            prof.stop()
            text = report(prof.key_averages(), profiled, self.start_after, wall, self.device)
        except Exception as err:  # a diagnostic must not end a training run (profilers differ between torch builds)
            warnings.warn(f"profile_steps: the profile could not be summarised ({type(err).__name__}: {err}); "
                          "training goes on", stacklevel=2)
            text = f"profile of {profiled} optimizer steps failed: {type(err).__name__}: {err}\n"
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)


def report(averages, steps: int, after: int, wall: float, device: torch.device) -> str:
    """profile.txt's text from a profile's key_averages."""
    per = 1 / max(steps, 1)
    lines = [f"profile of {steps} optimizer steps after {after} warm-up steps on {device}",
             f"wall time per step: {wall * per:.4f} s ({wall:.3f} s in all, profiler overhead included)"]
    if device.type == "cuda":
        # The kernels' and copies' own rows (as the table's "Self CUDA time total"): a CPU op's row
        # repeats the time of the kernels it launched, and a user range's spans them.
        busy = sum(event.self_device_time_total for event in averages
                   if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
                   and not getattr(event, "is_user_annotation", False)) / 1e6
        lines.append(f"device time per step: {busy * per:.4f} s (its kernels and copies, summed)")
    host = {"data" if event.key.startswith("enumerate(DataLoader)") else event.key: event.cpu_time_total / 1e6
            for event in averages if getattr(event, "device_type", None) == torch.autograd.DeviceType.CPU}
    lines += ["", "host time per step in the loop's parts (a part's self CPU time below: Python outside its ops)"]
    lines += [f"{part:<10} {host[part] * per:.4f} s" for part in PARTS if part in host]
    tables = [("self_cpu_time_total", "self CPU time")]
    if device.type == "cuda":
        tables.insert(0, ("self_device_time_total", "self CUDA time"))
    else:
        lines += ["", "(no CUDA table: the run was on the CPU)"]
    for key, title in tables:
        lines += ["", f"operators by {title}, top {TOP}", averages.table(sort_by=key, row_limit=TOP)]
    return "\n".join(lines) + "\n"
