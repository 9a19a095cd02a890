"""The Med-MoE block: where experts are chosen (router.py), how tokens reach them (dispatch.py),
what an expert is (experts.py), the block itself (block.py) and how a dense model becomes one
(upcycle.py)."""

from .block import MedMoEBlock, MoEState, LayerRouting
from .router import Router, RoutingDecision, route
from .experts import StackedExperts, ModuleExperts, LoRAExperts, ffn_kind
from .upcycle import upcycle_llm, decoder_layers

__all__ = [
    "MedMoEBlock", "MoEState", "LayerRouting", "Router", "RoutingDecision", "route",
    "StackedExperts", "ModuleExperts", "LoRAExperts", "ffn_kind", "upcycle_llm", "decoder_layers",
]
