"""The tower phase: the vision tower pretrained on image-level labels before phase 1.

The training splits say things about each image that phase 1's captions and phase 2's questions
only reach through the LLM: modality, organ, SLAKE's labelled structures, MedMNIST classes,
PathVQA's findings (data/labels.py). Here the tower learns them directly: its patch features,
averaged, feed one linear head per label family (cross-entropy; binary cross-entropy for the
multi-label structures), through the common loop (trainer.py: checkpoints, exact resume).

Images are split into training and held-out parts (each image on one side only). The held-out
predictions of the same linear probe (heads trained on frozen pooled features) are kept twice:
on the starting tower (ImageNet features) and on the trained one (`tower_predictions.json`;
`medmoe train` scores them with evaluation/labels.py: accuracy with 95% bootstrap intervals).
The tower is saved as <output_dir>/tower/tower.safetensors (written to a temporary file and
renamed), which phase 1 loads into the model it builds.
"""

from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.images import load_image, preprocess, random_view
from ..data.labels import MULTI_LABEL, ImageLabels, image_labels
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write_text
from . import distributed, params
from .data import load_records, split_repeat
from .distributed import single_process
from .recipe import Recipe, TowerRecipe
from .router import heldout_split
from .trainer import train

TOWER_FILE = "tower.safetensors"
PREDICTIONS_FILE = "tower_predictions.json"


# ----- labels as one target matrix -----------------------------------------------------------------

def target_matrix(labels: ImageLabels) -> tuple[torch.Tensor, dict[str, slice]]:
    """[N images, L] targets and each family's columns: a single-label family is one column of
    class indices, a multi-label one a 0/1 column per class; -100 where an image is unlabelled."""
    columns, layout, start = [], {}, 0
    for family, values in labels.labels.items():
        names = labels.classes[family]
        if family in MULTI_LABEL:
            block = torch.full((len(values), len(names)), -100.0)
            for i, v in enumerate(values):
                if v is not None:
                    block[i] = torch.tensor([float(n in v) for n in names])
        else:
            block = torch.tensor([[names.index(v) if v is not None else -100] for v in values], dtype=torch.float32)
        layout[family] = slice(start, start + block.shape[1])
        start += block.shape[1]
        columns.append(block)
    return torch.cat(columns, dim=1), layout


class LabelHeads(nn.Module):
    """The tower, its features averaged over tokens, and one linear head per family. Its forward
    takes the training loop's batch and returns `.loss`: the mean of the families' losses."""

    def __init__(self, tower: nn.Module, classes: dict[str, list[str]], layout: dict[str, slice]):
        super().__init__()
        self.vision_tower = tower
        self.layout = layout
        self.heads = nn.ModuleDict({f: nn.Linear(tower.hidden_size, len(c)) for f, c in classes.items()})

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values).float().mean(dim=1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(loss=heads_loss(self.heads, self.layout, self.pooled(pixel_values), labels))


def label_heads(dim: int, classes: dict[str, list[str]], generator: torch.Generator) -> nn.ModuleDict:
    """One linear head per family (dim -> its classes), initialised from `generator`: seeded, and
    the global random state (a phase's dropout) left as it was."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws a first initialisation from it
        heads = nn.ModuleDict({f: nn.Linear(dim, len(c)) for f, c in classes.items()})
    bound = 1 / dim ** 0.5
    for head in heads.values():
        nn.init.uniform_(head.weight, -bound, bound, generator=generator)
        nn.init.zeros_(head.bias)
    return heads


def heads_loss(heads: nn.ModuleDict, layout: dict[str, slice], features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses, idle = [], []
    for family, head in heads.items():
        t = targets[:, layout[family]]
        known = (t[:, 0] != -100).nonzero().squeeze(1)  # one host sync per family; indexing by it adds none
        if known.numel() == 0:  # kept in the graph at no cost: DDP expects a gradient for every head
            idle.append(head(features[:0]).sum())
            continue
        logits = head(features[known])
        if family in MULTI_LABEL:
            losses.append(F.binary_cross_entropy_with_logits(logits, t[known]))
        else:
            losses.append(F.cross_entropy(logits, t[known, 0].long()))
    # A batch without any label still gives a zero loss tied to the graph (every rank steps alike).
    loss = torch.stack(losses).mean() if losses else features.sum() * 0.0
    return loss + torch.stack(idle).sum() if idle else loss


class LabelImages(torch.utils.data.Dataset):
    def __init__(self, images: list[str], targets: torch.Tensor, size: int, mean, std, augment: bool = False):
        self.images, self.targets, self.size, self.mean, self.std, self.augment = images, targets, size, mean, std, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = load_image(self.images[i])
        if self.augment:
            image = random_view(image, self.mean)
        return {"pixel_values": preprocess(image, self.size, self.mean, self.std), "labels": self.targets[i]}


def collate(items: list[dict]) -> dict:
    """The loop's batch keys; one 'token' per image (tokens per second read as images per second)."""
    n = len(items)
    return {"input_ids": torch.zeros(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1, dtype=torch.long),
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items])}


# ----- the linear probe ---------------------------------------------------------------------------

@torch.no_grad()
def pooled_features(model: LabelHeads, dataset: LabelImages, batch_size: int, device, num_workers: int = 0) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    return torch.cat([model.pooled(b["pixel_values"].to(device)) for b in loader])


def linear_probe(features: torch.Tensor, targets: torch.Tensor, classes: dict, layout: dict, epochs: int,
                 seed: int, lr: float = 1e-3, batch_size: int = 64) -> nn.ModuleDict:
    """Heads trained on frozen features (Adam, seeded: the same probe before and after), on the
    features' device: thousands of tiny steps, which a busy many-core host runs far slower than a GPU."""
    g = torch.Generator().manual_seed(seed)
    heads = label_heads(features.shape[1], classes, g).to(features.device)
    targets = targets.to(features.device)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            idx = idx.to(features.device)
            loss = heads_loss(heads, layout, x[idx], targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    heads.normalise = (mean, std)
    return heads


@torch.no_grad()
def predictions(heads: nn.ModuleDict, features: torch.Tensor, targets: torch.Tensor, classes: dict, layout: dict) -> dict:
    """Per family, the held-out images' true and predicted labels (evaluation/labels.py scores them)."""
    mean, std = heads.normalise
    x = (features - mean) / std
    targets = targets.to(features.device)
    out = {}
    for family, head in heads.items():
        t = targets[:, layout[family]]
        known = t[:, 0] != -100
        logits = head(x[known])
        multi = family in MULTI_LABEL
        truth = t[known].long() if multi else t[known, 0].long()
        pred = (logits > 0).long() if multi else logits.argmax(-1)
        out[family] = {"truth": truth.tolist(), "pred": pred.tolist(), "classes": len(classes[family]), "multi_label": multi}
    return out


# ----- the phase -------------------------------------------------------------------------------------

def build_tower(recipe: Recipe):
    """The tower phase 1 would build (a preset's, with the recipe's vision changes), trainable."""
    if os.path.isfile(os.path.join(recipe.model, "config.json")):
        raise ConfigError(f"tower.enabled: {recipe.model} is a trained model folder; the tower phase pretrains "
                          "the tower of a preset before phase 1: set model to a preset name, or tower.enabled=false")
    from ..model.presets import preset
    from ..vision import build_vision_tower

    config = preset(recipe.model)
    config.vision = {**config.vision, **recipe.vision}
    return build_vision_tower(config.vision_config, load_weights=recipe.pretrained), config.vision_config


def select_images(labels: ImageLabels, records, per_dataset: int, seed: int) -> list[int]:
    """Indices of the images kept: every labelled one, or `per_dataset` of each dataset's, those
    with the most label families first (ties in a seeded random order): a PathVQA image with a
    finding and an organ teaches more than one known only to be pathology."""
    dataset_of = {r.image: r.dataset for r in records if r.image}
    families = [sum(v[i] is not None for v in labels.labels.values()) for i in range(len(labels.images))]
    labelled = [i for i in range(len(labels.images)) if families[i]]
    if not per_dataset:
        return labelled
    rng, kept = random.Random(seed), []
    for name in sorted({dataset_of[labels.images[i]] for i in labelled}):
        mine = [i for i in labelled if dataset_of[labels.images[i]] == name]
        rng.shuffle(mine)
        kept += sorted(mine, key=lambda i: -families[i])[:per_dataset]
    return sorted(kept)


def run_tower_phase(recipe: Recipe, run_dir: str, resume: bool = False, dist=None, on_step=None) -> dict:
    cfg: TowerRecipe = recipe.tower
    dist = dist or single_process()
    records = load_records([split_repeat(s)[0] for s in cfg.data], "train")
    labels = image_labels(records, cfg.families, cfg.min_count)
    if not labels.labels:
        raise ConfigError(f"tower.data {cfg.data} gives no label family with two classes of at least "
                          f"tower.min_count={cfg.min_count} images: add data or lower min_count")
    keep = select_images(labels, records, cfg.max_images_per_dataset, recipe.seed)
    targets, layout = target_matrix(labels)
    images, targets = [labels.images[i] for i in keep], targets[keep]
    train_idx, held_idx = heldout_split(len(images), cfg.heldout_fraction, recipe.seed)
    tower, vision = build_tower(recipe)
    size = cfg.image_size or vision.image_size
    model = LabelHeads(tower, labels.classes, layout).to(dist.device)

    def part(idx, augment=False):
        return LabelImages([images[i] for i in idx], targets[idx], size, vision.image_mean, vision.image_std, augment)

    def probe() -> dict:
        feats = pooled_features(model, part(range(len(images))), cfg.batch_size, dist.device, cfg.num_workers)
        heads = linear_probe(feats[train_idx], targets[train_idx], labels.classes, layout, cfg.probe_epochs, recipe.seed)
        return predictions(heads, feats[held_idx], targets[held_idx], labels.classes, layout)

    os.makedirs(run_dir, exist_ok=True)
    before_file = os.path.join(run_dir, "probe_before.json")
    if resume and os.path.isfile(before_file):  # the starting tower's probe, from the interrupted run
        with open(before_file) as f:
            before = json.load(f)
    else:
        before = probe()
        atomic_write_text(before_file, json.dumps(before))
    groups = {"vision": {f"vision_tower.{n}": p for n, p in model.vision_tower.named_parameters()},
              "heads": {f"heads.{n}": p for n, p in model.heads.named_parameters()}}
    groups = params.select(model, groups)
    wrapped = distributed.wrap(model, dist, "ddp")  # several processes: DDP (the tower is small)
    summary = train(model, part(train_idx.tolist(), cfg.augment_images), groups, cfg, run_dir, seed=recipe.seed,
                    resume=resume, dist=dist, wrapped=wrapped, collate_fn=collate, recipe=recipe.to_dict(),
                    title="tower", on_step=on_step)
    found = {"before": before, "after": probe(), "images": {"train": len(train_idx), "heldout": len(held_idx)},
             "image_size": size, "classes": labels.classes}
    if dist.is_main:
        atomic_write_text(os.path.join(run_dir, PREDICTIONS_FILE), json.dumps(found))
        save_tower(model.vision_tower, os.path.join(run_dir, TOWER_FILE))
    return {**summary, "phase": "tower", "dir": run_dir, "predictions": found if dist.is_main else None}


def save_tower(tower: nn.Module, path: str) -> None:
    """The tower's weights and BatchNorm statistics, written to a temporary file and renamed."""
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_tower(model, run_dir: str) -> None:
    """Phase 1: the pretrained tower into the model it starts from."""
    path = os.path.join(run_dir, TOWER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: run `medmoe train --recipe ... --phase tower` first, "
                              "or set tower.enabled=false")
    try:
        model.vision_tower.load_state_dict(load_file(path), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this model's vision tower ({str(err)[:200]}); it was trained "
                              "with other vision settings: run the tower phase again") from None
