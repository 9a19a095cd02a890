"""Inference: a Med-MoE layer's routed experts on a second CUDA stream, beside the layer's attention.

In Phi's parallel layer, `x + attn(ln(x)) + moe(ln(x))`, the experts need nothing but ln(x). In a
decode step the attention of one token runs one program per head (32 of the H200's 132 SMs) amid
a dozen small kernels, each too short to fill the GPU, while the chosen expert streams its weights
(105 MB at Phi-2 size): side by side, the expert's reads fill what the attention leaves idle, and
a decode step of a Phi-2-size Med-MoE on an H200 is about 5% (batch 1) to 15% (batch 8) shorter
(docs/speed.md).

`OverlappedMoE` stands in for a layer's `MedMoEBlock` (`engine.prepare` puts it there, once): the
layer's fused input product (engine/fused_projections.py) calls its `start` with ln(x), and its
forward joins the experts' output to the meta expert's where the block would add them. The block
declares when that is its whole forward (`MedMoEBlock.is_meta_plus_routed`); elsewhere the
block's own forward runs.

    key = register(block)                          # once, when the layer is wrapped
    routed, product = start(x, key, weight, bias)  # experts launched on the side stream, then x @ weight^T + bias
    ...                                            # the attention, on the main stream
    y = finish(routed, meta_out, x, key)           # main waits for the side stream: meta_out + routed

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
from ..moe.experts import ffn_forward

# Decode steps only: a prompt's experts are compute-bound like its attention, so they gain nothing
# beside it, and what the side stream allocates is not reused by the main one.
MAX_TOKENS = 64

_BLOCKS: dict[int, weakref.ref] = {}
_KEYS = itertools.count()
_DONE: dict[int, torch.cuda.Event] = {}  # key -> the event `start` recorded; `finish` waits for it
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


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
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


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


class OverlappedMoE(nn.Module):
    """Stands in for a layer's `MedMoEBlock`: its forward, except that the routed experts which the
    layer's fused input product launched (`start`) are joined here instead of run again."""

    inference_only = True  # the model's state dict now has other names: not for save_pretrained

    def __init__(self, block: MedMoEBlock):
        super().__init__()
        self.block = block
        self.key = register(block)
        self.started: torch.Tensor | None = None  # the experts' output `start` launched, until forward joins it

    def can_start(self, x: torch.Tensor) -> bool:
        """Whether the block's forward on x [N, d] is meta + routed experts and nothing else, in
        inference, for a decode step's tokens (at most MAX_TOKENS)."""
        return x.shape[0] <= MAX_TOKENS and not torch.is_grad_enabled() and self.block.is_meta_plus_routed()

    def start(self, hidden_states: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Launch the routed experts on a second CUDA stream, then return `hidden_states @ weight^T
        + bias` from the main stream: called by the fused input product of Phi's parallel layer, with
        the block's input, before the layer's attention. None (nothing launched) where the block's
        forward must run as it is."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.started = None  # nothing left from a forward that did not finish
        if not self.can_start(x):
            return None
        self.started, product = start(x, self.key, weight, bias)
        return product.reshape(*hidden_states.shape[:-1], weight.shape[0])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routed, self.started = self.started, None
        if routed is None:
            return self.block(hidden_states)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if routed.shape != x.shape:
            raise RuntimeError(f"MoE layer {self.block.layer_idx}: the experts were started on {tuple(routed.shape)} "
                               f"but the block runs on {tuple(x.shape)}; load the model with fuse_qkv=False")
        # the main stream waits here for the side one, as late as it can
        return finish(routed, ffn_forward(self.block.meta, x), x, self.key).reshape(shape)


def count_overlapped(model: nn.Module) -> int:
    """How many Med-MoE blocks start their experts beside the attention."""
    return sum(isinstance(m, OverlappedMoE) for m in model.modules())
