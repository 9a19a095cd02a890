"""Resumable training checkpoints: everything needed to continue exactly where a run stopped.

A checkpoint is a folder `<run>/checkpoints/step-00000123/` with
- `model.safetensors`: the trainable parameters (frozen ones never change, so the phase's starting
  model plus this file is the exact model),
- `optimizer.safetensors`: AdamW moments and step counts, keyed by parameter name,
- `rng.safetensors`: the torch CPU and CUDA generator states,
- `state.json`: step, data position, scheduler state, optimizer hyper-parameters, Python and NumPy
  RNG states, and the recipe that made it.
It is written in a temporary folder and renamed into place, so a killed run never leaves a
half-written checkpoint; only the newest `keep_last` are kept. Works the same under DDP and FSDP2
(the state dicts are gathered to full tensors through torch.distributed.checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import CheckpointError

PREFIX = "step-"


def _flatten(state: dict) -> dict[str, torch.Tensor]:
    """{'name': {'exp_avg': t, ...}} -> {'name::exp_avg': t}."""
    return {f"{name}::{key}": t.detach().cpu().contiguous() for name, s in state.items() for key, t in s.items()}


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    for flat, t in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = t
    return state


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _options(**kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_parameter_names(model) -> set[str]:
    """Names as the full state dict spells them (without DDP's `module.` prefix)."""
    inner = getattr(model, "module", model)
    return {n for n, p in inner.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, position: dict, recipe: dict,
                    keep_last: int = 2, is_main: bool = True) -> str | None:
    """Write a checkpoint atomically. Every rank must call it (FSDP gathers); only the main rank writes."""
    weights = get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options())
    if not is_main:
        return None
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{PREFIX}{step:08d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
    save_file(_flatten(optim["state"]), os.path.join(tmp, "optimizer.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
    state = {"step": step, "position": position, "scheduler": scheduler.state_dict(), "param_groups": groups,
             "rng": rng_meta, "recipe": recipe}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    if os.path.exists(final):  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG; returns state.json (step, position, ...)."""
    files = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {missing}); delete it and resume "
                              "from an earlier one")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    weights = load_file(os.path.join(path, "model.safetensors"))
    expected = trainable_parameter_names(model)
    # The saved state also holds buffers (batch-norm statistics) and tied aliases (lm_head of a
    # tied embedding): only parameters trained then but frozen now, or the reverse, are a mismatch.
    parameters = {n for n, _ in getattr(model, "module", model).named_parameters()}
    missing, unexpected = expected - set(weights), (set(weights) & parameters) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: trainable parameters differ from this run's (missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
                              "resume with the same recipe and phase")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    optim = {"state": _unflatten(load_file(os.path.join(path, "optimizer.safetensors"))),
             "param_groups": state["param_groups"]}
    # Not strict: a trained parameter that never gets a gradient (the ImageNet classifier of an
    # EfficientNet tower, which the image tokens do not use) has no AdamW state in either run.
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(os.path.join(path, "rng.safetensors")), state["rng"])
    return state
