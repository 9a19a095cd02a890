"""Loading: a bundled model's name, a folder of ours, an official Med-MoE / MoE-LLaVA checkpoint or
a delta on pretrained base weights -> (model, processor).

This sits above the model and the conversion of official checkpoints, so that neither imports the
other: `MedMoEForCausalLM.from_pretrained` reads our own folders, and the two other formats are
registered with it here (`register_folder_format`), so that it reads them too.

    model, processor = load_model("nano")                          # any of the above
    model, processor = load_for_inference(folder, device="auto")   # merged adapters, engine applied
"""

from __future__ import annotations

import torch

from .conversion.official import is_official_folder, load_official
from .data.processor import MedMoEProcessor
from .engine.prepare import prepare
from .files import folder_config
from .model.modeling import MedMoEForCausalLM, register_folder_format
from .model.pretrained import BUNDLED_MODELS, DEFAULT_MODEL, load_delta, pick_device, pick_dtype, resolve_model_path

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "is_delta_folder", "load_for_inference", "load_model", "resolve_model_path"]


def is_delta_folder(path: str) -> bool:
    """A folder saved by `save_delta`: its config.json names the `base_model` its weights add to."""
    cfg = folder_config(path)
    return cfg is not None and bool(cfg.get("base_model")) and not is_official_folder(path)


def _official(path: str, dtype=None, device=None, vision_tower: str | None = None, vision_dtype=None,
              drop_tokens_like_official: bool = False, **_) -> MedMoEForCausalLM:
    return load_official(path, vision_tower=vision_tower, dtype=dtype, device=device, vision_dtype=vision_dtype,
                         drop_tokens_like_official=drop_tokens_like_official)


def _delta(path: str, dtype=None, device=None, **_) -> MedMoEForCausalLM:
    return load_delta(path, dtype=dtype, device=device)[0]


register_folder_format("official", is_official_folder, _official)
register_folder_format("delta", is_delta_folder, _delta)


def load_model(path: str, dtype=None, device=None) -> tuple[MedMoEForCausalLM, MedMoEProcessor]:
    """(model, processor) from any model folder: a full save, a delta on pretrained base weights
    (the shipped Nano model), or an official Med-MoE / MoE-LLaVA checkpoint; or a bundled name."""
    path = resolve_model_path(path)
    if is_delta_folder(path):
        return load_delta(path, dtype=dtype, device=device)
    model = MedMoEForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    return model, MedMoEProcessor.from_pretrained(path, model.config.vision_config)


def load_for_inference(path: str, device: str | None = "auto", dtype: str | torch.dtype | None = "auto",
                       merge_adapters: bool = True, fuse_qkv: bool | None = None):
    """(model, processor) in eval mode on the chosen device (auto: GPU when present) and dtype
    (auto: bfloat16 on a GPU and on a CPU with bfloat16 hardware, else float32; `pick_dtype`). LLM
    LoRA adapters are merged into the weights (computed in float32): one matmul per projection
    instead of three, the same outputs.
    `fuse_qkv` (default: on a GPU) prepares the language model for fast decoding
    (`engine.prepare`: fused projections, the experts beside the attention, the one-token
    attention kernel): faster small-batch decoding, the same outputs to rounding."""
    dev = pick_device(device)
    model, processor = load_model(path, dtype=pick_dtype(dtype, dev))
    if merge_adapters and model.config.llm_lora:
        model.merge_llm_lora()
    if fuse_qkv is None:
        fuse_qkv = dev.type == "cuda"
    if fuse_qkv:
        prepare(model)
    return model.to(dev).eval(), processor

