"""The vision tower's batch sizes in prefill forwards, whose shapes change with every batch of prompts.

cuDNN's convolutions build an execution plan the first time they see a shape: 2 ms per tower
convolution on an H100 (docs/lab/speed-history.md, run O). So the tower sees a few batch sizes
only, its images padded up to a power of two on a GPU. Prefill attention leaves cuDNN out for the
same reason (model/attention_kernels.py)."""

from __future__ import annotations

import torch


def tower_batch(images: int, device: torch.device) -> int:
    """The batch the tower runs `images` at: the next power of two on a GPU (few shapes, so few
    cuDNN plans), exactly `images` on the CPU (where padding would cost its arithmetic)."""
    if device.type != "cuda" or images <= 1:
        return images
    return 1 << (images - 1).bit_length()
