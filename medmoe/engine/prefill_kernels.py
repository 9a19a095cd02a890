"""The engine's shape buckets (powers of two), and the vision tower's batch sizes in prefill
forwards, whose shapes change with every batch of prompts.

cuDNN's convolutions build an execution plan the first time they see a shape: 2 ms per tower
convolution on an H100 (docs/lab/speed-history.md, run O). So the tower sees a few batch sizes
only, its images padded up to a power of two on a GPU. Prefill attention leaves cuDNN out for the
same reason (model/attention_kernels.py)."""

from __future__ import annotations

import torch


def pow2_at_least(n: int, least: int = 1) -> int:
    """The smallest power of two >= n (and >= least): the engine's shape buckets."""
    return max(least, 1 << max(n - 1, 0).bit_length())


def tower_batch(images: int, device: torch.device) -> int:
    """The batch the tower runs `images` at: the next power of two on a GPU (few shapes, so few
    cuDNN plans), exactly `images` on the CPU (where padding would cost its arithmetic)."""
    if device.type != "cuda" or images <= 1:
        return images
    return pow2_at_least(images)
