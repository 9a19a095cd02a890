"""medmoe: lightweight medical vision-language models with domain-specific experts (Med-MoE)."""

from .config import IMAGE_TOKEN, MODALITIES, MedMoEConfig, MoEConfig, VisionConfig
from .errors import MedMoEError
from .loading import load_model
from .model import MedMoEForCausalLM, MedMoEOutput
from .version import __version__

__all__ = ["IMAGE_TOKEN", "MODALITIES", "MedMoEConfig", "MoEConfig", "VisionConfig", "MedMoEError",
           "MedMoEForCausalLM", "MedMoEOutput", "load_model", "__version__"]


def __getattr__(name):  # `from medmoe import MedMoE` without importing the serving stack up front
    if name == "MedMoE":
        from .serving.api import MedMoE
        return MedMoE
    raise AttributeError(f"module 'medmoe' has no attribute {name!r}")
