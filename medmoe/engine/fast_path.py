"""The one place the engine reaches the inference speed-ups that live elsewhere (fused projections,
experts on a side stream, the static decode path's checks): a path change is a one-line fix here."""

from __future__ import annotations

from ..generation.fast_decode import graph_safe

__all__ = ["graph_safe"]
