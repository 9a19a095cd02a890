"""Upcycling: a dense LLM becomes Med-MoE. In each chosen layer the FFN is copied into the
domain experts and kept, unchanged, as the meta expert."""

from __future__ import annotations

from torch import nn

from ..config import ConfigError, MoEConfig
from .block import MedMoEBlock, MoEState
from .experts import LoRAExperts, ModuleExperts, StackedExperts, ffn_kind
from .router import Router

FFN_ATTRIBUTES = ("mlp", "feed_forward", "ffn")


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM (Llama, Phi, StableLM, Qwen2, ...)."""
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    for candidate in (base, getattr(base, "model", None)):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the decoder layers of {type(llm).__name__}: expected `.model.layers`")


def ffn_attribute(layer: nn.Module) -> str:
    for name in FFN_ATTRIBUTES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ConfigError(f"cannot find the FFN of {type(layer).__name__}: expected one of {FFN_ATTRIBUTES}")


def make_experts(mlp: nn.Module, cfg: MoEConfig) -> nn.Module:
    if cfg.expert_type == "lora":
        return LoRAExperts(mlp, cfg.num_experts, cfg.expert_lora.rank, cfg.expert_lora.alpha)
    if ffn_kind(mlp) is not None:
        return StackedExperts.from_ffn(mlp, cfg.num_experts)
    return ModuleExperts(mlp, cfg.num_experts)


def upcycle_llm(llm: nn.Module, cfg: MoEConfig, state: MoEState, shared_router: Router | None) -> list[MedMoEBlock]:
    """Replace the FFN of each chosen layer by a MedMoEBlock, in place. Returns the blocks."""
    layers = decoder_layers(llm)
    hidden = llm.config.hidden_size
    blocks = []
    for i in cfg.layer_indices(len(layers)):
        attr = ffn_attribute(layers[i])
        mlp = getattr(layers[i], attr)
        if isinstance(mlp, MedMoEBlock):
            raise ConfigError(f"layer {i} is already a Med-MoE block: upcycle a dense model")
        if cfg.expert_type == "lora" and not cfg.meta_expert:
            raise ConfigError("LoRA experts are deltas on the meta expert's FFN: keep moe.meta_expert=true")
        experts = make_experts(mlp, cfg)
        router = None
        if cfg.router_sharing == "per_layer":
            router = Router(hidden, cfg.num_experts).to(next(mlp.parameters()).device)
        block = MedMoEBlock(i, experts, mlp if cfg.meta_expert else None, cfg, state, router=router,
                            shared_router=shared_router)
        if not cfg.meta_expert and cfg.expert_type == "full":
            del mlp
        setattr(layers[i], attr, block)
        blocks.append(block)
    return blocks
