"""Where image features become LLM tokens: the projector (LLaVA's `linear` or `mlp2x_gelu`)."""

from __future__ import annotations

from torch import nn

from .errors import ConfigError


def build_projector(kind: str, vision_size: int, hidden_size: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_size, hidden_size)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    raise ConfigError(f"projector {kind!r}: use 'linear' or 'mlp2x_gelu'")
