"""The model: modeling.py (the forward pass), presets.py (named configs), pretrained.py (real weights),
params.py (parameter accounting)."""

from .modeling import MedMoEForCausalLM, MedMoEOutput
from .presets import PRESETS, load_config, preset

__all__ = ["MedMoEForCausalLM", "MedMoEOutput", "PRESETS", "load_config", "preset"]
