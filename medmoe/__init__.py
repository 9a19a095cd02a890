"""medmoe: lightweight medical vision-language models with domain-specific experts (Med-MoE)."""

from .config import IMAGE_TOKEN, MODALITIES, MedMoEConfig, MoEConfig, VisionConfig
from .errors import MedMoEError
from .model import MedMoEForCausalLM, MedMoEOutput

__version__ = "0.1.0"

__all__ = ["IMAGE_TOKEN", "MODALITIES", "MedMoEConfig", "MoEConfig", "VisionConfig", "MedMoEError",
           "MedMoEForCausalLM", "MedMoEOutput", "__version__"]


def __getattr__(name):  # `from medmoe import MedMoE` without importing the serving stack up front
    if name == "MedMoE":
        from .serving.api import MedMoE
        return MedMoE
    raise AttributeError(f"module 'medmoe' has no attribute {name!r}")
