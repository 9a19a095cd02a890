"""The vision tower and projector of a prefill forward as CUDA graphs, one per batch size.

A prefill forward's images run through the tower together, padded to a power of two
(prefill_kernels.tower_batch). Eagerly, the tower's kernels (EfficientNet's convolutions and
activations, a ViT's layers) cost the host their launches: 15 to 25 ms a prefill forward for
nano's EfficientNet-Lite0 on an H100, while the device needed far less (docs/lab/speed-history.md,
run Q). Warm-up captures the tower once per power of two up to the engine's staging slots at the
model's image size; a batch of another shape runs eagerly."""

from __future__ import annotations

import logging

import torch

from ..errors import is_out_of_memory
from .graph_capture import GraphRecorder
from .prefill_kernels import pow2_at_least

logger = logging.getLogger(__name__)
WARMUP_FORWARDS = 2  # eager forwards of a batch size before its capture (cuDNN plans, autotuning)


class TowerGraphs:
    def __init__(self, model, max_images: int, stats):
        self.model, self.stats = model, stats
        self.max_images = pow2_at_least(max(max_images, 1))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.recorder = GraphRecorder()
        self.enabled = True

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens [n, num_tokens, d] of pixels [n, 3, H, W] (on the device, in the tower's
        dtype); from a graph, the graph's output buffer: read it before the next call."""
        entry = self.graphs.get((*pixels.shape, pixels.dtype))
        if entry is None:
            return self.model.encode_images(pixels)
        graph, static_in, static_out = entry
        static_in.copy_(pixels)
        graph.replay()
        self.stats.tower_replays += 1
        return static_out

    def warm_up(self, image_size: int, dtype: torch.dtype, device: torch.device) -> int:
        """Capture every power-of-two batch up to `max_images` of image_size² pixels. Returns the
        graphs captured; on a capture failure the tower runs eagerly from then on."""
        sizes, n = [], 1
        while n <= self.max_images:
            sizes.append(n)
            n *= 2
        for n in sizes:
            pixels = torch.zeros(n, 3, image_size, image_size, dtype=dtype, device=device)
            key = (*pixels.shape, pixels.dtype)
            if not self.enabled or key in self.graphs:
                continue
            for _ in range(WARMUP_FORWARDS):
                self.model.encode_images(pixels)
            try:
                self.graphs[key] = self._capture(pixels)
            except Exception as err:
                if is_out_of_memory(err):
                    raise
                logger.warning("capturing the vision tower's CUDA graph failed (%s: %s); the tower runs eagerly "
                               "(slower, the same tokens)", type(err).__name__, err)
                self.enabled = False
                self.graphs.clear()
                self.stats.graph_fallbacks += 1
                return 0
            self.stats.tower_captures += 1
        return len(self.graphs)

    def _capture(self, pixels: torch.Tensor):
        static_in = pixels.clone()
        graph = torch.cuda.CUDAGraph()
        with self.recorder.recording(graph):
            static_out = self.model.encode_images(static_in)
        return graph, static_in, static_out
