"""Training recipes: one JSON file describes all phases; `key=value` overrides change any field.

A recipe file (`medmoe/recipes/<name>.json` or any path) holds the top-level fields of `Recipe`
and one section per phase. Overrides use dotted keys (`phase2.lr=1e-4`, `phase3.moe.expert_type=lora`)
and are type-checked against the dataclasses below: a wrong key or value raises `ConfigError`
naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from importlib import resources

from ..errors import ConfigError
from ..files import read_json
from ..model.recompute import CHECKPOINTING_CHOICES, NAMED_SETTINGS

PHASES = ("1", "2", "router", "3")


@dataclass
class PhaseRecipe:
    """The training-loop settings one phase uses (phase 1, 2 and 3 share them)."""

    data: list[str] = field(default_factory=lambda: ["sample"])  # data sources (see training/data.py)
    template: str = "medmoe"  # "plain" for phase-1 captions, "medmoe" for QA
    epochs: float = 1.0
    max_steps: int = 0  # >0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 4  # per device, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-5
    lr_groups: dict[str, float] = field(default_factory=dict)  # group name -> its own learning rate
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # 0: no clipping
    max_length: int = 2048  # longer samples are truncated
    max_samples: int = 0  # >0: use only the first N samples (quick runs)
    augment_images: bool = False  # train on a random view of each image (crop, rotation, light; no flips)
    # true: every layer; n: every n-th layer (less recompute); "selective": every layer, keeping the
    # matrix products' outputs (almost no recompute, still frees the wide elementwise activations);
    # "activations": no layer, only every FFN's activation output recomputed (no time, less memory)
    grad_checkpointing: bool | int | str = False
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    log_every: int = 10
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end; -1: none (no resume)
    keep_last: int = 2
    num_workers: int = 0


@dataclass
class RouterRecipe:
    """The official router recipe: pooled features of the frozen phase-2 model, Linear(d, 4)."""

    data: list[str] = field(default_factory=lambda: ["sample"])
    max_samples: int = 1000  # the paper: about 1,000 labelled samples suffice
    heldout_fraction: float = 0.1
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    per_layer: bool = False  # also train one router per MoE layer on the real FFN inputs
    max_length: int = 512


@dataclass
class Phase2Recipe(PhaseRecipe):
    # {"rank": r, "alpha": a[, "targets": [...]]}: train LoRA adapters on the LLM's linear layers instead
    # of all LLM weights (compact: the result ships as a small delta on the pretrained base).
    llm_lora: dict = field(default_factory=dict)
    # Also train the vision tower (group "vision", its own rate through lr_groups). Worth it for a
    # small ImageNet tower meeting medical images; the paper keeps CLIP frozen.
    train_vision: bool = False


@dataclass
class Phase3Recipe(PhaseRecipe):
    moe: dict = field(default_factory=dict)  # MoEConfig fields (layers, num_experts, expert_type, ...)
    trainable: str = "experts"  # "experts": experts + meta expert (paper); "official": + dense FFNs + projector
    train_meta: bool = True
    train_router: bool = False
    # "modality": the router phase's classifier (paper); "random": a plain router learned in this
    # phase from scratch (the paper's ablation; needs train_router=true)
    router_init: str = "modality"


@dataclass
class Recipe:
    model: str = "tiny"  # a preset name (tiny, nano, phi2, stablelm) or a model folder
    pretrained: bool = True
    # Changes to a preset's vision config (VisionConfig fields), e.g. {"image_size": 448}: nano's
    # tower then gives 14 x 14 = 196 image tokens instead of 7 x 7. Set in phase 1; later phases
    # and the saved model carry it.
    vision: dict = field(default_factory=dict)
    output_dir: str = "runs/tiny"
    seed: int = 0
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    phase1: PhaseRecipe = field(default_factory=lambda: PhaseRecipe(template="plain", lr=1e-3))
    phase2: Phase2Recipe = field(default_factory=Phase2Recipe)
    router: RouterRecipe = field(default_factory=RouterRecipe)
    phase3: Phase3Recipe = field(default_factory=Phase3Recipe)

    def __post_init__(self):
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed={self.distributed!r}: use 'ddp' or 'fsdp'")
        for name in ("phase1", "phase2", "phase3"):
            p = getattr(self, name)
            for key in ("batch_size", "grad_accum", "keep_last"):
                if getattr(p, key) < 1:
                    raise ConfigError(f"{name}.{key}={getattr(p, key)}: must be at least 1")
            _check_checkpointing(f"{name}.grad_checkpointing", p.grad_checkpointing)
            if p.template not in ("medmoe", "plain", "chat"):
                raise ConfigError(f"{name}.template={p.template!r}: use 'medmoe', 'plain' or 'chat'")
        unknown_lora = sorted(set(self.phase2.llm_lora) - {"rank", "alpha", "targets"})
        if unknown_lora:
            raise ConfigError(f"unknown key phase2.llm_lora.{unknown_lora[0]}; valid keys: rank, alpha, targets")
        if self.phase2.llm_lora and int(self.phase2.llm_lora.get("rank", 0)) < 1:
            raise ConfigError("phase2.llm_lora needs a rank of at least 1, e.g. phase2.llm_lora={\"rank\": 8, \"alpha\": 16}")
        if self.phase3.router_init not in ("modality", "random"):
            raise ConfigError(f"phase3.router_init={self.phase3.router_init!r}: use 'modality' or 'random'")
        if self.phase3.router_init == "random" and not self.phase3.train_router:
            raise ConfigError("phase3.router_init=random needs phase3.train_router=true (a random router must learn)")
        if self.phase3.trainable not in ("experts", "official"):
            raise ConfigError(f"phase3.trainable={self.phase3.trainable!r}: use 'experts' or 'official'")
        from ..config import MoEConfig, VisionConfig

        vision_keys = [f.name for f in dataclasses.fields(VisionConfig)]
        unknown = sorted(set(self.vision) - set(vision_keys))
        if unknown:
            raise ConfigError(f"unknown key vision.{unknown[0]}; valid keys: {', '.join('vision.' + v for v in vision_keys)}")
        valid = [f.name for f in dataclasses.fields(MoEConfig)]
        unknown = sorted(set(self.phase3.moe) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key phase3.moe.{unknown[0]}; valid keys: {', '.join('phase3.moe.' + v for v in valid)}")
        MoEConfig(**self.phase3.moe)  # value checks (raise ConfigError naming the field)
        if not 0 < self.router.heldout_fraction < 1:
            raise ConfigError(f"router.heldout_fraction={self.router.heldout_fraction}: must be between 0 and 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_checkpointing(key: str, value) -> None:
    choices = CHECKPOINTING_CHOICES
    if isinstance(value, str) and value not in NAMED_SETTINGS:
        raise ConfigError(f"{key}={value!r}: use one of {choices}")
    if not isinstance(value, str) and value < 0:
        raise ConfigError(f"{key}={value}: must be at least 0 ({choices})")


# ----- building from dicts, with clear errors ------------------------------------------------------

def _check_type(key: str, value, hint):
    """Return `value` converted to `hint` (int -> float allowed), or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        for arm in typing.get_args(hint):
            try:
                return _check_type(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (str, bool) and type(value) is hint:
        return value
    elif origin is list and isinstance(value, list):
        (arm,) = typing.get_args(hint) or (typing.Any,)
        return value if arm is typing.Any else [_check_type(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    elif (origin is dict or hint is dict) and isinstance(value, dict):
        args = typing.get_args(hint)
        return {k: _check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()} if args else value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}={value!r}: expected {name}, got {type(value).__name__}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown recipe key '{prefix}{key}'; valid keys: {', '.join(prefix + n for n in names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            # A phase section starts from that phase's defaults (phase 1 differs from phase 2).
            base = dataclasses.asdict(getattr(cls(), key))
            kwargs[key] = _build(hint, {**base, **value} if isinstance(value, dict) else value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
    return cls(**kwargs)


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data)


def phase_recipe(values: dict, overrides: list[str] | None = None) -> PhaseRecipe:
    """One phase's settings (`medmoe finetune`): PhaseRecipe defaults, then `values`, then
    `key=value` overrides of its fields (lr=1e-4 grad_accum=4), type-checked like a recipe."""
    data = {**dataclasses.asdict(PhaseRecipe()), **values}
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise ConfigError(f"override {text!r}: fine-tuning settings are flat keys, e.g. lr=1e-4")
        data[keys[0]] = value
    phase = _build(PhaseRecipe, data)
    _check_checkpointing("grad_checkpointing", phase.grad_checkpointing)
    return phase


def parse_override(text: str) -> tuple[list[str], object]:
    """'phase2.lr=1e-4' -> (['phase2', 'lr'], 1e-4). Values are JSON, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write key=value, for example phase2.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))
    for text in overrides:
        keys, value = parse_override(text)
        node, cls, path = data, Recipe, ""
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            hints = typing.get_type_hints(cls) if cls is not None else None
            if hints is not None and key not in hints:
                valid = ", ".join(path + n for n in hints)
                raise ConfigError(f"override {text!r}: unknown key {path + key!r}; valid keys: {valid}")
            if last:
                node[key] = value
            else:
                hint = hints[key] if hints is not None else None
                cls = hint if dataclasses.is_dataclass(hint) else None
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {path + key} is not a section")
            path += key + "."
    return data


def recipe_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    bundled = resources.files("medmoe") / "recipes" / f"{name_or_path}.json"
    if bundled.is_file():
        return str(bundled)
    raise ConfigError(f"recipe {name_or_path!r} not found: give a JSON file or one of {', '.join(bundled_recipes())}")


def bundled_recipes() -> list[str]:
    folder = resources.files("medmoe") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(name_or_path)
    data = read_json(path, ConfigError)
    data.pop("description", None)
    try:
        return recipe_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
