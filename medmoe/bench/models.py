"""Random-weight models of the paper's size for speed measurements (no downloads).

The Phi-2 language model is built from its config; CLIP ViT-L/14-336 is replaced by a one-conv
stand-in with the same output (576 tokens of width 1024): the tower is frozen and runs once per
image, so only the image tokens' shape matters for decode and training speed.
"""

from __future__ import annotations

import torch

from ..model.modeling import MedMoEForCausalLM
from ..model.presets import preset

IMAGE_TOKENS_PHI2 = dict(kind="tiny", image_size=336, tiny_patch=14, hidden_size=1024, num_tokens=576)


def phi2_medmoe(device: torch.device, dtype: torch.dtype = torch.bfloat16, moe: dict | None = None,
                text: dict | None = None) -> MedMoEForCausalLM:
    """A Phi-2-size Med-MoE (4 experts + meta in every other layer) with random weights, on `device`.

    `text` overrides fields of the Phi-2 config (smaller models for smoke tests)."""
    cfg = preset("phi2")
    cfg.vision = {**cfg.vision, **IMAGE_TOKENS_PHI2, "kind": "tiny"}
    cfg.text_config = {**cfg.text_config, **(text or {})}
    cfg.moe = {**cfg.moe, **(moe or {}), "enabled": True}
    cfg.image_token_id = cfg.text_config["vocab_size"] - 1  # random weights: any id will do
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MedMoEForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def image_prompt(model: MedMoEForCausalLM, batch: int, text_tokens: int, device: torch.device, seed: int = 0):
    """input_ids [B, 1 + image tokens + text], attention_mask, pixel_values: one image per sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img = cfg.vision_config.num_tokens
    vocab = cfg.text_config["vocab_size"] - 2
    text = torch.randint(0, vocab, (batch, text_tokens), generator=g)
    image = torch.full((batch, n_img), cfg.image_token_id)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], 1).to(device)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device, model.dtype)
    return ids, torch.ones_like(ids), pixels


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
