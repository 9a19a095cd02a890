"""medmoe: lightweight medical vision-language models with domain-specific experts (Med-MoE)."""

from .config import IMAGE_TOKEN, MODALITIES, MedMoEConfig, MoEConfig, VisionConfig
from .errors import MedMoEError
from .model import MedMoEForCausalLM, MedMoEOutput

__version__ = "0.1.0"
__all__ = ["IMAGE_TOKEN", "MODALITIES", "MedMoEConfig", "MoEConfig", "VisionConfig", "MedMoEError",
           "MedMoEForCausalLM", "MedMoEOutput", "__version__"]
