"""Any transformers vision model (CLIP, SigLIP, ViT, ...) as a vision tower, LLaVA style:
the hidden states of layer `feature_layer` (the penultimate by default), CLS dropped for select="patch".

Two ways to build it:
- `load_weights=True`: `from_pretrained(cfg.name_or_path)`, a hub id (from the local cache) or a folder.
  Full CLIP / SigLIP checkpoints work: only the vision half is loaded (CLIPVisionModel,
  SiglipVisionModel). The vision config is then stored in `cfg.model_config`, so a saved Med-MoE
  model can rebuild the same tower without the original weights.
- `load_weights=False` with `cfg.model_config` (a dict with `model_type`, e.g. "clip_vision_model"):
  the architecture with random weights; the real ones come from the Med-MoE checkpoint.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from ..config import VisionConfig
from ..errors import CheckpointError, ConfigError
from .base import VisionTower

# Keys of a config dict that describe the file, not the architecture.
_NOT_ARCHITECTURE = ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures")


def vision_config_from_dict(model_config: dict) -> PretrainedConfig:
    config = dict(model_config)
    if "model_type" not in config:
        raise ConfigError("vision.model_config needs a 'model_type' (for example 'clip_vision_model' or "
                          "'siglip_vision_model')")
    try:
        return AutoConfig.for_model(config.pop("model_type"), **config)
    except ValueError as err:
        raise ConfigError(f"vision.model_config: {err}") from None


def model_class(vision_config: PretrainedConfig) -> type[PreTrainedModel]:
    """The bare model class for a vision config: CLIPVisionConfig -> CLIPVisionModel, and so on."""
    try:
        return AutoModel._model_mapping[type(vision_config)]
    except KeyError:
        raise ConfigError(f"no transformers model for vision config {type(vision_config).__name__}") from None


def load_pretrained_vision_model(name_or_path: str) -> PreTrainedModel:
    """The vision part of a hub id or folder; for CLIP/SigLIP pairs, only the image encoder."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise ConfigError(f"vision.name_or_path={name_or_path!r}: cannot load ({err}); put the model "
                          "(config.json + weights) in a folder and set vision.name_or_path to it") from None
    vision_config = getattr(config, "vision_config", None) or config
    # from_pretrained picks `vision_config` out of a full CLIP/SigLIP config; the text half's weights
    # are expected leftovers, so its load report is silenced and only missing weights are an error.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class(vision_config).from_pretrained(name_or_path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise CheckpointError(f"{name_or_path}: vision weights missing or of the wrong shape: "
                              f"{sorted(info['missing_keys'])[:5]} {list(info['mismatched_keys'])[:5]}")
    return model


def architecture_dict(config: PretrainedConfig) -> dict:
    """A config as a small dict (non-default values + model_type) to store in config.json."""
    d = config.to_diff_dict()
    for key in _NOT_ARCHITECTURE:
        d.pop(key, None)
    d["model_type"] = config.model_type
    return d


def has_cls_token(model: torch.nn.Module) -> bool:
    """CLIP (`class_embedding`) and ViT (`cls_token`) prepend a CLS token; SigLIP does not."""
    return any(name.endswith(("class_embedding", "cls_token")) for name, _ in model.named_parameters())


class HFVisionTower(VisionTower):
    def __init__(self, cfg: VisionConfig, load_weights: bool = True):
        super().__init__(cfg)
        if load_weights and cfg.name_or_path:
            self.model = load_pretrained_vision_model(cfg.name_or_path)
            cfg.model_config = architecture_dict(self.model.config)
        elif cfg.model_config:
            if load_weights:
                warnings.warn("vision.name_or_path is not set: the hf vision tower gets random weights", stacklevel=2)
            vision_config = vision_config_from_dict(cfg.model_config)
            self.model = model_class(vision_config)(vision_config)
        else:
            raise ConfigError("vision.kind='hf' needs vision.name_or_path (a hub id or folder with the weights) "
                              "or vision.model_config (a transformers vision config dict)")
        config = self.model.config
        image_size, patch_size = int(config.image_size), int(config.patch_size)
        if cfg.image_size != image_size:
            raise ConfigError(f"vision.image_size={cfg.image_size} but the {config.model_type} tower expects "
                              f"{image_size}; set vision.image_size={image_size}")
        self.has_cls = has_cls_token(self.model)
        self.drop_cls = self.has_cls and cfg.select == "patch"
        self.feature_layer = cfg.feature_layer
        self.hidden_size = int(config.hidden_size)
        self.num_tokens = (image_size // patch_size) ** 2 + int(self.has_cls and not self.drop_cls)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]
        return hidden[:, 1:] if self.drop_cls else hidden
