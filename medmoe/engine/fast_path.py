"""The one place the scheduler reaches the speed-ups of the static decode path (its check that a
model's MoE blocks run without host syncs)."""

from __future__ import annotations

from .static_decode import graph_safe

__all__ = ["graph_safe"]
