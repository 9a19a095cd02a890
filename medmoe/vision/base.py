"""The contract every vision tower keeps: pixel_values [B, 3, H, W] -> patch features
[B, num_tokens, hidden_size], frozen by default (tower.py builds one by `vision.kind`)."""

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
        self.batch_norm_frozen = False  # train the weights but keep the BatchNorm statistics (fine-tuning)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.features(pixel_values).detach()
        return self.features(pixel_values)

    def train(self, mode: bool = True):
        # A frozen tower stays in eval mode (BatchNorm statistics, dropout) while the rest trains.
        super().train(mode and not self.frozen)
        if self.batch_norm_frozen:  # small batches of few images would make batch statistics noisy
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def freeze(self, frozen: bool = True) -> None:
        self.frozen = frozen
        self.requires_grad_(not frozen)
        self.train(self.training)
