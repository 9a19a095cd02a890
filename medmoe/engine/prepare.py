"""The one place where a loaded model is changed for fast inference, once, before it generates.

The model stays the plain reference a reader follows (model/modeling.py, moe/block.py); what is
faster at inference replaces some of its modules, each replacement tested against the plain
module's outputs:

- fused_layers.py: attention modules with one product for their query, key and value
  projections; Phi's parallel layers whole, with two products instead of six (the FFN's, or the
  Med-MoE meta expert's, projections join the attention's), their routed experts started beside
  the attention on a second CUDA stream (overlap.py), where the block declares that its forward
  is meta expert + routed experts;
- decode_attention.py: Phi's one-token attention step, rotary embedding and cache write in one op
  (inside the fused modules, or around a PhiAttention left unfused).

The replaced modules say so (`inference_only`), and `save_pretrained` refuses such a model:
`unprepare` puts the plain modules back.

    prepare(model)      # after merging LoRA adapters; loading.load_for_inference does it on a GPU
    unprepare(model)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import decode_attention, fused_layers


@dataclass
class Prepared:
    """What `prepare` changed: attention layers whose projections are fused, of them Phi parallel
    layers, Med-MoE blocks whose experts start beside the attention, layers whose one-token step
    runs the rotary-and-cache-write op."""

    fused_layers: int
    parallel_layers: int
    overlapped_moe_layers: int
    decode_attention_layers: int


def _language_model(model: nn.Module) -> nn.Module:
    """The LLM: the vision tower runs once per image, so nothing is gained there."""
    return getattr(model, "language_model", model)


def prepare(model: nn.Module, fuse: bool = True, parallel: bool = True, overlap_experts: bool = True,
            decode_attention_kernel: bool = True) -> Prepared:
    """Replace the language model's modules by their inference forms: `fuse` the projections
    (`parallel`: Phi's layers whole; `overlap_experts`: Med-MoE experts beside the attention) and,
    with `decode_attention_kernel`, Phi's one-token attention step."""
    lm = _language_model(model)
    fused = fused_layers.fuse(lm, parallel, overlap_experts, decode_attention_kernel) if fuse else 0
    if decode_attention_kernel:
        decode_attention.install(lm)  # the Phi attention modules left unfused
    return Prepared(fused, fused_layers.count_parallel(lm), fused_layers.count_overlapped(lm),
                    fused_layers.count_one_token(lm) + decode_attention.count_installed(lm))


def unprepare(model: nn.Module) -> int:
    """Undo `prepare`: the plain modules and weights back (e.g. before save_pretrained); returns
    how many modules were put back."""
    lm = _language_model(model)
    return decode_attention.uninstall(lm) + fused_layers.unfuse(lm)
