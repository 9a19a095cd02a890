"""Where an image becomes features: vision towers (frozen by default)."""

from .tower import VisionTower, build_vision_tower

__all__ = ["VisionTower", "build_vision_tower"]
