"""Parameter accounting, built on the meta device (no weights, no memory).

Counting conventions for the LLM (vision tower and projector reported separately and added in
`with_vision`):
- total: every parameter the model holds; per MoE layer that is E domain experts + the meta expert
  (the official code's convention: 6.1B for Phi-2).
- total_paper_convention: the paper's: per MoE layer only E FFNs, i.e. the meta expert counted as
  one of them (E - 1 extra copies; 5.3B for Phi-2).
- activated_per_token: the dense LLM plus, per MoE layer, the top-k domain experts beyond the meta
  expert (3.6B for Phi-2: 2.78B + 16 x 52.4M), router included.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MedMoEConfig
from .modeling import MedMoEForCausalLM


def _count(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    seen, total = set(), 0
    for p in module.parameters():  # tied weights are one Parameter object: count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_parameters(config: MedMoEConfig, moe: bool | None = None) -> dict:
    """Counts for `config` (turned into Med-MoE with its moe settings unless `moe=False`)."""
    config = MedMoEConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    moe_cfg = config.moe_config
    if moe is not None:
        config.moe = dataclasses.asdict(dataclasses.replace(moe_cfg, enabled=moe))
    with torch.device("meta"):
        model = MedMoEForCausalLM(config)
    llm = _count(model.language_model) + _count(model.router)
    vision = _count(model.vision_tower)
    projector = _count(model.projector)
    result = {
        "config": config.text_config.get("model_type"),
        "moe_layers": [b.layer_idx for b in model.moe_blocks],
        "num_experts": moe_cfg.num_experts if model.moe_blocks else 0,
        "top_k": moe_cfg.top_k if model.moe_blocks else 0,
        "meta_expert": moe_cfg.meta_expert if model.moe_blocks else False,
        "expert_type": moe_cfg.expert_type if model.moe_blocks else None,
    }
    inactive = paper_saving = 0
    per_expert = meta_ffn = 0
    for block in model.moe_blocks:
        per_expert = _count(block.experts) // moe_cfg.num_experts
        meta_ffn = _count(block.meta)
        inactive += (moe_cfg.num_experts - moe_cfg.top_k) * per_expert
        paper_saving += meta_ffn if moe_cfg.expert_type == "full" else 0
    active = llm - inactive
    result.update({
        "total": llm,
        "total_paper_convention": llm - paper_saving,
        "activated_per_token": active,
        "dense_llm": llm - sum(_count(b.experts) for b in model.moe_blocks) - _count(model.router)
                     - sum(_count(b.router) for b in model.moe_blocks),
        "params_per_expert": per_expert,
        "meta_expert_params": meta_ffn,
        "vision_tower": vision,
        "projector": projector,
        "with_vision": {
            "total": llm + vision + projector,
            "total_paper_convention": llm - paper_saving + vision + projector,
            "activated_per_token": active + vision + projector,
        },
        "counting": "LLM only unless under with_vision; total holds E experts + meta per MoE layer "
                    "(official code), total_paper_convention E FFNs per MoE layer (paper); activated = "
                    "dense LLM + top-k experts per MoE layer + router",
    })
    return result
