"""Kernel choices for prefill forwards, whose shapes change with every batch of prompts.

cuDNN's attention (the first choice of `scaled_dot_product_attention` on recent GPUs) and cuDNN's
convolutions build an execution plan the first time they see a shape. A decode step replays one
CUDA graph per shape, so it pays that once; a prefill has new shapes almost every time. Measured
on an H100 (docs/lab/speed-history.md, run O): 7.8 ms of host time per cuDNN attention call,
about 0.23 s per prefill forward of the nano model, and 2 ms per tower convolution. So prefill
attention runs on the flash or memory-efficient kernels, and the vision tower sees a few batch
sizes only (its images padded up to a power of two on a GPU)."""

from __future__ import annotations

import contextlib

import torch

PREFILL_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # torch.nn.attention.SDPBackend names


def prefill_attention(device: torch.device):
    """A context in which scaled_dot_product_attention leaves cuDNN's kernel out (a GPU only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in PREFILL_ATTENTION])


def tower_batch(images: int, device: torch.device) -> int:
    """The batch the tower runs `images` at: the next power of two on a GPU (few shapes, so few
    cuDNN plans), exactly `images` on the CPU (where padding would cost its arithmetic)."""
    if device.type != "cuda" or images <= 1:
        return images
    return 1 << (images - 1).bit_length()
