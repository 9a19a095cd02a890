"""Fine-tuning a trained model on new data: the paper's last step (it fine-tunes Med-MoE on each
benchmark's train split before testing), and how a user adapts the bundled Med-MoE-Nano to their
own questions. A Med-MoE model trains what phase 3 trains (the experts and the meta expert, the
router too with `train_router`); a dense model what phase 2 trains. The loop, its checkpoints and
`resume` are those of `medmoe train`.

    summary = finetune("nano", PhaseRecipe(data=["data/vqa-rad"], epochs=2, lr=2e-4), "runs/ft")
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import ConfigError
from . import distributed, image_contrast, params
from .image_loss import combined
from .data import Collate, load_records, records_dataset, sample_weights
from .phases import check_fresh, image_losses, label_counts, load_model, save_model, write_summary
from .recipe import PhaseRecipe
from .trainer import train


def finetune_groups(model, train_router: bool = False, train_projector: bool = False, train_vision: bool = False):
    """What fine-tuning trains: phase 3's groups for Med-MoE, phase 2's for a dense model; the
    image path (projector, vision tower) on request, for images unlike the training data's."""
    if model.is_moe:
        groups = params.phase3_groups(model, "experts", train_meta=True, train_router=train_router)
        if train_projector:
            groups["projector"] = params.phase1_groups(model)["projector"]
    elif train_router:
        raise ConfigError("--train-router: this model is dense (no router); fine-tuning trains what phase 2 trained")
    else:
        groups = params.phase2_groups(model)  # the projector trains here anyway
    if train_vision:
        groups["vision"] = params.vision_group(model)
    return groups


def image_losses_for(model, records, phase: PhaseRecipe, groups: dict, dist, seed: int) -> list:
    """Phase 2's auxiliary image losses on the fine-tuning records (`contrastive_weight`,
    `label_loss_weight`), each head a group of its own. They teach the projector, so the projector
    must train (a dense model's always does; a Med-MoE model's with --train-projector)."""
    wanted = [name for name in ("contrastive_weight", "label_loss_weight") if getattr(phase, name) > 0]
    if wanted and "projector" not in groups:
        raise ConfigError(f"{' and '.join(wanted)} > 0 train the projector through the images: add "
                          "--train-projector (and --train-vision to let the tower learn too)")
    losses = image_losses(model, records, phase, "2", dist, seed)
    for loss in losses:
        groups[loss.head_name] = loss.head_parameters(model)
    return losses


def finetune(model_path: str, phase: PhaseRecipe, out_dir: str, resume: bool = False, train_router: bool = False,
             seed: int = 0, train_projector: bool = False, train_vision: bool = False) -> dict:
    """Train `model_path` (a model folder or a bundled name) on `phase.data`; the result goes to
    `out_dir/model`, checkpoints and the loss curve to `out_dir`. `train_projector` and
    `train_vision` also train the image path (the vision tower's rate: `phase.lr_groups["vision"]`)."""
    dist = distributed.setup()
    torch.manual_seed(seed)
    check_fresh(out_dir, resume)
    records = load_records(phase.data)  # a wrong --data fails here, before the model loads
    model, processor = load_model(model_path)
    groups = finetune_groups(model, train_router, train_projector, train_vision)
    heads = image_losses_for(model, records, phase, groups, dist, seed)
    groups = params.select(model, groups)
    if train_vision:  # its weights adapt; its BatchNorm statistics stay those of its training
        model.vision_tower.batch_norm_frozen = True
    dataset = records_dataset(records, processor, phase.template, phase.max_length, phase.augment_images)
    wrapped = distributed.wrap(model, dist, "ddp")
    settings = {"finetune": {"model": model_path, "train_router": train_router, "train_projector": train_projector,
                             "train_vision": train_vision, "seed": seed,
                             "phase": dataclasses.asdict(phase)}}
    terms = heads + image_contrast.setup(phase.image_contrast_weight, phase.image_contrast_cap, "finetune", dist)
    summary = train(model, dataset, groups, phase, out_dir, seed=seed, resume=resume, dist=dist, wrapped=wrapped,
                    collate_fn=Collate(processor), recipe=settings, title="fine-tune",
                    weights=sample_weights(records, phase.balanced_sampling),
                    extra_losses=combined(terms))
    for loss in heads:
        loss.remove(model)
    out = os.path.join(out_dir, "model")
    save_model(model, wrapped, processor, out, dist)
    if dist.is_main:
        write_summary(out_dir, summary, groups, {**settings, **label_counts(heads)})
    summary.update(dir=out_dir, model_dir=out)
    return summary
