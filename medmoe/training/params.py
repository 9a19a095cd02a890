"""Which parameters each phase trains. One explicit function per phase returns named groups
{group name: {parameter name: parameter}}; `select` freezes everything else.

- phase 1: the projector.
- phase 2: the LLM and the projector (the vision tower stays frozen unless `phase2.train_vision`);
  with `phase2.llm_lora`, the LLM's LoRA adapters instead of all its weights.
- phase 3: the domain experts and the meta expert of every MoE layer (paper); "official" adds the
  dense FFNs of the other layers and the projector, as the official code does. The router is
  frozen unless asked for.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..moe.upcycle import decoder_layers, ffn_attribute

Groups = dict[str, dict[str, nn.Parameter]]


def _named(model: nn.Module, module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of a sub-module, under their full names in `model`."""
    ids = {id(p) for p in module.parameters()}
    return {n: p for n, p in model.named_parameters(remove_duplicate=True) if id(p) in ids}


def phase1_groups(model) -> Groups:
    return {"projector": _named(model, model.projector)}


def phase2_groups(model, train_vision: bool = False) -> Groups:
    if model.is_moe:
        raise ConfigError("phase 2 trains a dense model; this one is already Med-MoE (phase 3 output?)")
    llm = _named(model, model.language_model)
    if model.config.llm_lora:  # compact phase 2: only the LoRA adapters of the LLM train
        llm = _lora_only(llm)
    groups = {"llm": llm, "projector": _named(model, model.projector)}
    if train_vision:  # a small tower (EfficientNet-Lite0, 4.7M) can afford to adapt to medical images
        groups["vision"] = vision_group(model)
    return groups


def vision_group(model) -> dict[str, nn.Parameter]:
    """The vision tower's parameters (phase 2 with `train_vision`, `medmoe finetune --train-vision`)."""
    return _named(model, model.vision_tower)


def _lora_only(named: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    return {n: p for n, p in named.items() if n.endswith(("lora_A", "lora_B"))}


def phase3_groups(model, trainable: str = "experts", train_meta: bool = True, train_router: bool = False) -> Groups:
    if not model.is_moe:
        raise ConfigError("phase 3 trains a Med-MoE model: upcycle the phase-2 model first")
    groups: Groups = {"experts": {}, "meta": {}}
    for block in model.moe_blocks:
        groups["experts"].update(_named(model, block.experts))
        if block.meta is not None and train_meta:
            meta = _named(model, block.meta)
            # A LoRA-adapted LLM stays compact: its meta experts train their adapters only.
            groups["meta"].update(_lora_only(meta) if model.config.llm_lora else meta)
    if trainable == "official":
        moe_layers = {b.layer_idx for b in model.moe_blocks}
        groups["dense_ffn"] = {}
        for i, layer in enumerate(decoder_layers(model.language_model)):
            if i not in moe_layers:
                groups["dense_ffn"].update(_named(model, getattr(layer, ffn_attribute(layer))))
        groups["projector"] = _named(model, model.projector)
    elif trainable != "experts":
        raise ConfigError(f"phase3.trainable={trainable!r}: use 'experts' or 'official'")
    if train_router:
        routers = [model.router] if model.router is not None else [b.router for b in model.moe_blocks]
        groups["router"] = {}
        for r in routers:
            groups["router"].update(_named(model, r))
    return {name: params for name, params in groups.items() if params}


def select(model: nn.Module, groups: Groups) -> Groups:
    """Freeze every parameter, then unfreeze exactly those in `groups`."""
    model.requires_grad_(False)
    for params in groups.values():
        for p in params.values():
            p.requires_grad_(True)
    tower = getattr(model, "vision_tower", None)
    if tower is not None and hasattr(tower, "freeze"):
        # A tower that does not train runs without autograd and keeps its BatchNorm statistics.
        tower.freeze(not any(p.requires_grad for p in tower.parameters()))
    return groups


def trainable_names(groups: Groups) -> list[str]:
    return sorted(n for params in groups.values() for n in params)
