"""The three phases and the router, in order. Each reads the previous one's output folder:

    <output_dir>/tower/tower.safetensors   the vision tower pretrained on labels (tower.enabled only)
    <output_dir>/phase1/model   projector trained (alignment)
    <output_dir>/phase2/model   LLM + projector trained (instruction tuning)
    <output_dir>/router         router.safetensors (+ metrics), from the frozen phase-2 model
    <output_dir>/phase3/model   upcycled Med-MoE, experts (+ chosen set) trained

Every phase folder also holds metrics.jsonl, loss.png and checkpoints/ (for --resume).
"""

from __future__ import annotations

import json
import os

import torch

from ..config import MoEConfig
from ..errors import CheckpointError, ConfigError
from ..files import read_json
from . import contrastive, distributed, image_contrast, label_loss, params
from .checkpoint import list_checkpoints
from .data import Collate, build_dataset, load_records, sample_weights, split_repeat
from .image_loss import combined
from .recipe import PHASES, Recipe
from .router import ROUTER_FILE, load_router_weights, run_router_phase
from .tower import PREDICTIONS_FILE, TOWER_FILE, load_tower, run_tower_phase
from .trainer import train

PREVIOUS = {"2": "phase1", "router": "phase2", "3": "phase2"}


def phase_dir(recipe: Recipe, phase: str) -> str:
    return os.path.join(recipe.output_dir, phase if phase in ("router", "tower") else f"phase{phase}")


def model_dir(recipe: Recipe, phase: str) -> str:
    return os.path.join(phase_dir(recipe, phase), "model")


def load_model(path: str):
    from ..loading import load_model as load_any

    return load_any(path)


def starting_model(recipe: Recipe, phase: str):
    """Phase 1 starts from the recipe's model (a preset built fresh, or a model folder); later
    phases from the previous phase's output."""
    if phase == "1":
        if os.path.isfile(os.path.join(recipe.model, "config.json")):  # a model folder, else a preset name
            if recipe.vision:
                raise ConfigError(f"recipe key vision changes a preset's tower; {recipe.model} is a trained model "
                                  "folder whose tower is already built: remove vision from the recipe")
            return load_model(recipe.model)
        from ..model.presets import preset
        from ..model.pretrained import build_model

        config = preset(recipe.model)
        config.vision = {**config.vision, **recipe.vision}
        config.vision_config  # checks the merged values (ConfigError naming the field)
        model, processor = build_model(recipe.model, pretrained=recipe.pretrained, config=config, seed=recipe.seed)
        if recipe.tower.enabled:
            load_tower(model, phase_dir(recipe, "tower"))
        return model, processor
    source = os.path.join(recipe.output_dir, PREVIOUS[phase], "model")
    if not os.path.isfile(os.path.join(source, "config.json")):
        before = PREVIOUS[phase].replace("phase", "")
        raise CheckpointError(f"{source} not found: run `medmoe train --recipe ... --phase {before}` first")
    return load_model(source)


def save_model(model, wrapped, processor, path: str, dist) -> None:
    """Final model folder (config.json + model.safetensors + tokenizer), written by the main rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if distributed.is_sharded(model):  # FSDP2: gather full tensors on every rank, rank 0 writes
        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_main:
            from safetensors.torch import save_file

            os.makedirs(path, exist_ok=True)
            model.config.save_pretrained(path)
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    elif dist.is_main:
        model.save_pretrained(path)
    if dist.is_main:
        processor.save_pretrained(path)


def write_summary(run_dir: str, summary: dict, groups, extra: dict | None = None) -> None:
    """run_dir/summary.json: the loop's summary, the trained parameter counts per group, `extra`."""
    summary["trainable"] = {name: sum(p.numel() for p in g.values()) for name, g in groups.items()}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({**(extra or {}), **{k: v for k, v in summary.items() if k != "phase"}}, f, indent=2)


def image_losses(model, records, cfg, phase: str, dist, seed: int) -> list:
    """The auxiliary image losses `cfg` asks for (`contrastive_weight`: training/contrastive.py;
    `label_loss_weight`: training/label_loss.py), attached to `model` before its parameters are
    grouped; each is the trainer's extra loss and names its head's parameter group."""
    losses = []
    if cfg.contrastive_weight > 0:
        losses.append(contrastive.setup(model, records, cfg.contrastive_weight, cfg.contrastive_temperature,
                                        phase, dist, seed=seed))
    if cfg.label_loss_weight > 0:
        losses.append(label_loss.setup(model, records, cfg.label_loss_weight, cfg.label_loss_families,
                                       cfg.label_loss_min_count, phase, dist, seed=seed))
    return losses


def label_counts(losses) -> dict:
    """{"label_loss_images": the label loss's images per family} for the run's summary, or {}."""
    return {"label_loss_images": loss.counts() for loss in losses if isinstance(loss, label_loss.LabelLoss)}


def check_fresh(run_dir: str, resume: bool) -> None:
    if not resume and list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already has checkpoints: pass --resume to continue that run, "
                          "or choose another output_dir (override output_dir=...)")


def _groups(model, recipe: Recipe, phase: str):
    if phase == "1":
        return params.phase1_groups(model)
    if phase == "2":
        return params.phase2_groups(model, recipe.phase2.train_vision)
    p3 = recipe.phase3
    return params.phase3_groups(model, p3.trainable, p3.train_meta, p3.train_router)


def upcycle_for_phase3(model, recipe: Recipe):
    """The phase-2 model becomes Med-MoE; the router phase's weights go into its router(s)."""
    model.upcycle(MoEConfig.from_dict({**recipe.phase3.moe, "enabled": True}, "phase3.moe."))
    router_file = os.path.join(phase_dir(recipe, "router"), ROUTER_FILE)
    if recipe.phase3.router_init == "random":
        return model  # the plain learned router of the paper's ablation: trained in this phase only
    if os.path.isfile(router_file):
        load_router_weights(model, router_file)
    elif not recipe.phase3.train_router:
        raise CheckpointError(f"{router_file} not found: run `--phase router` first, or train the router in "
                              "phase 3 with phase3.train_router=true")
    return model


def run_phase(recipe: Recipe, phase: str, resume: bool = False, on_step=None) -> dict:
    if phase not in PHASES:
        raise ConfigError(f"--phase {phase!r}: use one of {', '.join(PHASES)}")
    dist = distributed.setup()
    torch.manual_seed(recipe.seed)
    run_dir = phase_dir(recipe, phase)
    if phase == "tower":
        if not recipe.tower.enabled:
            return {"phase": "tower", "dir": run_dir, "skipped": True}
        check_fresh(run_dir, resume)
        return run_tower_phase(recipe, run_dir, resume=resume, dist=dist, on_step=on_step)
    model, processor = starting_model(recipe, phase)
    if phase == "router":
        cfg = recipe.router
        model.to(dist.device)
        # Repeats ("data/vqa-rad*3") would put copies of one sample on both sides of the held-out split.
        records = load_records([split_repeat(source)[0] for source in cfg.data], "train")
        layers = MoEConfig.from_dict({**recipe.phase3.moe, "enabled": True}, "phase3.moe.").layer_indices(model.config.num_hidden_layers)
        metrics = run_router_phase(model, processor, records, cfg, run_dir, layers, seed=recipe.seed) if dist.is_main else {}
        distributed.barrier(dist)
        return {"phase": "router", "dir": run_dir, "metrics": metrics}

    cfg = getattr(recipe, f"phase{phase}")
    check_fresh(run_dir, resume)
    if phase == "2" and cfg.llm_lora and not model.config.llm_lora:
        model.add_llm_lora(**cfg.llm_lora.to_dict())
    if phase == "3":
        upcycle_for_phase3(model, recipe)
    dataset = build_dataset(cfg.data, processor, cfg.template, cfg.max_length, augment_images=cfg.augment_images)
    # auxiliary losses: their heads join the model for this phase (checkpoints, resume), then leave
    losses = image_losses(model, dataset.records, cfg, phase, dist, recipe.seed)
    groups = _groups(model, recipe, phase)
    for loss in losses:
        groups[loss.head_name] = loss.head_parameters(model)
    groups = params.select(model, groups)
    terms = losses + image_contrast.setup(cfg.image_contrast_weight, cfg.image_contrast_cap, f"phase{phase}", dist)
    wrapped = distributed.wrap(model, dist, recipe.distributed)
    summary = train(model, dataset, groups, cfg, run_dir, seed=recipe.seed, resume=resume, dist=dist,
                    wrapped=wrapped, collate_fn=Collate(processor), recipe=recipe.to_dict(), title=f"phase {phase}",
                    on_step=on_step, weights=sample_weights(dataset.records, cfg.balanced_sampling),
                    extra_losses=combined(terms))
    for loss in losses:
        loss.remove(model)
    out = model_dir(recipe, phase)
    save_model(model, wrapped, processor, out, dist)
    if dist.is_main:
        write_summary(run_dir, summary, groups, label_counts(losses) or None)
    summary.update(phase=phase, dir=run_dir, model_dir=out)
    return summary


def finished(recipe: Recipe, phase: str) -> dict | None:
    """The summary of a phase that already ran to the end (its model or router saved), else None."""
    run_dir = phase_dir(recipe, phase)
    if phase == "tower":
        found = os.path.join(run_dir, PREDICTIONS_FILE)
        done = os.path.isfile(os.path.join(run_dir, TOWER_FILE)) and os.path.isfile(found)
        return {"phase": phase, "dir": run_dir, "predictions": read_json(found)} if done else None
    if phase == "router":
        metrics = os.path.join(run_dir, "router_metrics.json")
        done = os.path.isfile(os.path.join(run_dir, ROUTER_FILE)) and os.path.isfile(metrics)
        return {"phase": phase, "dir": run_dir, "metrics": read_json(metrics)} if done else None
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary) and os.path.isfile(os.path.join(model_dir(recipe, phase), "config.json")):
        return {**read_json(summary), "phase": phase, "dir": run_dir, "model_dir": model_dir(recipe, phase)}
    return None


def run_or_skip(recipe: Recipe, phase: str, resume: bool = False) -> dict:
    """run_phase, except that with `resume` a phase that already finished is skipped."""
    done = finished(recipe, phase) if resume else None
    if done is None:
        return run_phase(recipe, phase, resume=resume)
    print(f"medmoe: phase {phase} already finished in {done['dir']}; skipped (delete it to train again)", flush=True)
    return done


def run_all(recipe: Recipe, resume: bool = False) -> list[dict]:
    """Every phase in order; with `resume`, phases that already finished are skipped."""
    return [run_or_skip(recipe, p, resume=resume) for p in PHASES]

