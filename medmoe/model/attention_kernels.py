"""Which attention kernels run where shapes change with every batch: training steps, prefill
forwards and choice scoring.

cuDNN's attention, the first choice of `scaled_dot_product_attention` on recent GPUs, builds an
execution plan the first time it sees a shape. A decode step replays one CUDA graph per shape and
pays that once; a training batch or a prefill has a new length almost every time. Measured
(docs/lab/speed-history.md, run O; docs/lab/nano-v2.md, run 10): 7.8 ms of host time per call in
an H100 prefill, 1.5 to 7.5 ms per call in an H200 training step, where the GPU itself needs 10 to
70 microseconds. So these paths run the flash or memory-efficient kernels
(math where neither applies), and the CPU keeps its own choice."""

from __future__ import annotations

import contextlib

import torch

VARYING_SHAPE_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # torch.nn.attention.SDPBackend names


def varying_shape_attention(device: torch.device):
    """A context in which scaled_dot_product_attention leaves cuDNN's kernel out (a GPU only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in VARYING_SHAPE_ATTENTION])
