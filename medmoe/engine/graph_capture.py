"""Where the engine records its CUDA graphs: each owner (the decode step, the prefill step, the
tower) on a capture stream of its own, into a memory pool of its own.

PyTorch keys cuBLAS's workspace by stream, and a graph keeps the workspace address it was recorded
with (pytorch/pytorch#193402). Graphs recorded on one stream (torch.cuda.graph's shared default)
therefore share that scratch memory: harmless while they replay one after the other, as the engine
replays them, but a prefill graph replayed beside decode steps on a second stream would read and
write the decode graph's workspace. The routed experts' side stream (engine/overlap.py) is one per
capture stream for the same reason.
"""

from __future__ import annotations

import torch


class GraphRecorder:
    """One owner's graph memory: a pool for all its graphs (they never replay at once) and the
    stream they are recorded on."""

    def __init__(self):
        self.pool = None
        self.stream: torch.cuda.Stream | None = None

    def recording(self, graph: torch.cuda.CUDAGraph):
        """torch.cuda.graph(graph) on this owner's stream and pool; the host waits for the device first."""
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return torch.cuda.graph(graph, pool=self.pool, stream=self.stream)

    def release(self) -> None:
        """Forget the pool once its graphs are gone (the last graph of a pool frees it: recording into
        its handle again fails); the stream stays, as torch.cuda.graph asks for a pool's next capture."""
        self.pool = None
