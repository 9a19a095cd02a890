"""Inference: a Med-MoE layer's routed experts on a second CUDA stream, beside the layer's attention.

In Phi's parallel layer, `x + attn(ln(x)) + moe(ln(x))`, the experts need nothing but ln(x). In a
decode step the attention of one token runs one program per head (32 of the H200's 132 SMs) amid
a dozen small kernels, each too short to fill the GPU, while the chosen expert streams its weights
(105 MB at Phi-2 size): side by side, the expert's reads fill what the attention leaves idle, and
a decode step of a Phi-2-size Med-MoE on an H200 is about 5% (batch 1) to 15% (batch 8) shorter
(docs/speed.md).

A fused Phi layer (engine/fused_layers.py: FusedPhiDecoderLayer) computes its meta expert in its
own products and holds an `OverlappedMoE` for the block's routed experts: `start` launches them
with ln(x) before the layer's input product, `finish` adds them to the layer's output product. The
block declares when its forward is nothing more (`MedMoEBlock.is_meta_plus_routed`); elsewhere the
layer runs the block's own forward.

    key = register(block)                          # once, when the layer is fused
    routed, product = start(x, key, weight, bias)  # experts launched on the side stream, then x @ weight^T + bias
    ...                                            # the attention, on the main stream
    y = finish(routed, shared, x, key)             # main waits for the side stream: shared + routed

Both are custom ops, opaque to torch.compile (the experts' code within `start` is compiled on its
own when the step around it is). `start` makes the side stream wait for the main one, runs the
block's routing and experts there (the same code as the block's own forward) and records an
event; `finish` makes the main stream wait for that event, in an op that (for torch.compile)
mutates `routed` and returns nothing, so that the sum after it fuses with the layer's residual
add and the next norm instead of running as a kernel of its own. Captured in a CUDA graph, they
are the graph's fork and join. Off CUDA, `start` computes the experts at once and `finish` only adds.
The routing runs on the side stream as well: routed on the main stream before the launch, the
experts would share the bandwidth of the input product, the step's critical path, and the step
is slower.

Memory: `start` allocates its output on the main stream before switching, so the main stream owns
it; what the side stream allocates stays on the side stream's pool (stream-ordered reuse); `finish`
takes x as well, so that its memory is not reused while the side stream may still read it.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch
from torch import nn

from ..moe import MedMoEBlock, kernels

# Decode steps only: a prompt's experts are compute-bound like its attention, so they gain nothing
# beside it, and what the side stream allocates is not reused by the main one.
MAX_TOKENS = 64

_BLOCKS: dict[int, weakref.ref] = {}
_KEYS = itertools.count()
_DONE: dict[int, torch.cuda.Event] = {}  # key -> the event `start` recorded; `finish` waits for it
_SIDE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}  # (device, main stream) -> side stream


def register(block) -> int:
    """A key for `block` (a MedMoEBlock; held weakly), for the ops below."""
    for gone in [k for k, ref in _BLOCKS.items() if ref() is None]:
        del _BLOCKS[gone]
    key = next(_KEYS)
    _BLOCKS[key] = weakref.ref(block)
    return key


def _block(key: int):
    block = _BLOCKS.get(key)
    block = block() if block is not None else None
    if block is None:
        raise RuntimeError(f"MoE block {key} for the overlapped experts is gone; prepare the model again (engine.prepare)")
    return block


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # One side stream per main stream: graphs recorded on different streams (engine/graph_capture.py)
    # then fork onto different side streams, and keep separate cuBLAS workspaces there too.
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch.cuda.current_stream(index).stream_id)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[key]


def _routed(block, x: torch.Tensor) -> torch.Tensor:
    return block.routed_experts(x)


@functools.lru_cache(maxsize=None)
def _compiled_routed():
    # Once for all blocks (their weights are inputs to the compiled code, not constants of it).
    return torch.compile(_routed, dynamic=False)


@torch.library.custom_op("medmoe::routed_experts_start", mutates_args=())
def _start(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int,
           compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    block = _block(key)
    routed = _compiled_routed() if compiled else _routed
    if not x.is_cuda:
        return routed(block, x), kernels.linear(x, weight, bias)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    out = torch.empty_like(x)  # owned by the main stream, written by the side one
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out.copy_(routed(block, x))
        done = torch.cuda.Event()
        done.record(side)
    _DONE[key] = done
    return out, kernels.linear(x, weight, bias)


@_start.register_fake
def _(x, weight, bias, key, compiled):
    return torch.empty_like(x), x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("medmoe::routed_experts_wait", mutates_args=("routed",))
def _wait(routed: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, key: int) -> None:
    # Declared as mutating `routed` (the side stream writes it) so that what reads it comes after;
    # `shared` is an input only so that the wait comes after it: scheduled freely, torch.compile puts
    # the wait before the layer's output product, which then no longer runs beside the experts.
    done = _DONE.pop(key, None)
    if done is not None:
        torch.cuda.current_stream(routed.device).wait_event(done)


@_wait.register_fake
def _(routed, shared, x, key):
    return None


def start(x: torch.Tensor, key: int, weight: torch.Tensor,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(routed, x @ weight^T + bias): sum_k w_k E_{i_k}(x) of block `key` for the tokens x [N, d],
    launched on the side stream, and then the layer's input product on the main stream (kernels.linear).

    The product is in the same op so that the launch comes before it: torch.compile's scheduler
    moves an op whose output is needed late (the experts') to late in the step, to lower peak
    memory, and the experts would then run beside the output product instead of the attention. Inside a
    compiled step the experts' own code is compiled too (the router's, bias and activation kernels
    fused as in the step), once for all blocks."""
    return _start(x, weight, bias, key, torch.compiler.is_compiling())


def finish(routed: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
    """shared + routed, once the side stream has written `routed` (x: the experts' input, kept alive)."""
    _wait(routed, shared, x, key)
    return shared + routed


class OverlappedMoE:
    """The routed experts of a Med-MoE block whose meta expert a fused layer computes in its own
    products (engine/fused_layers.py: FusedPhiDecoderLayer), launched on a second CUDA stream beside
    the layer's attention. Holds the block's key for the ops above and nothing from one forward
    to the next: `start` returns what `finish` joins."""

    def __init__(self, block: MedMoEBlock):
        self.block = block
        self.key = register(block)

    def can_start(self, x: torch.Tensor) -> bool:
        """Whether the block's forward on x [N, d] is its routed experts and nothing else, in
        inference, for a decode step's tokens (at most MAX_TOKENS)."""
        return x.shape[0] <= MAX_TOKENS and not torch.is_grad_enabled() and self.block.is_meta_plus_routed()

    def start(self, hidden_states: torch.Tensor, linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the block's routed experts on hidden_states, launched on the side stream; then
        linear(hidden_states) on the main stream, the layer's input product). None (nothing
        launched) where the block's forward must run as it is, or `linear` is not a plain linear."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if type(linear) is not nn.Linear or not self.can_start(x):
            return None
        routed, product = start(x, self.key, linear.weight, linear.bias)
        return routed, product.reshape(*hidden_states.shape[:-1], linear.weight.shape[0])

    def finish(self, routed: torch.Tensor, shared: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """shared + the experts `start` launched on hidden_states, once the side stream is done."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if routed.shape != x.shape:
            raise RuntimeError(f"MoE layer {self.block.layer_idx}: the experts were started on {tuple(routed.shape)} "
                               f"but are joined on {tuple(x.shape)}")
        return finish(routed, shared.reshape(x.shape[0], -1), x, self.key).reshape(shared.shape)
