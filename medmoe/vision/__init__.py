"""Where an image becomes features: vision towers (frozen by default)."""

from .base import VisionTower
from .tower import build_vision_tower

__all__ = ["VisionTower", "build_vision_tower"]
