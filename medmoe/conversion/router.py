"""The official stand-alone routers (`phi_router.pth`, `stablelm_router.pth`) -> safetensors.

Each is the state dict of a one-layer modality classifier, `fc1.weight` [4, d] and `fc1.bias` [4]
(a pickle, read with weights_only=True). We write `router.weight` / `router.bias`, the names of our
model's shared router, so `load_router(model, path)` (or training) can use them directly.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from ..config import MODALITIES
from ..errors import CheckpointError
from .files import load_tensors


def read_router(path: str) -> dict[str, torch.Tensor]:
    """`router.weight` [E, d] and `router.bias` [E] from an official router file (or one of ours)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such router file")
    state = load_tensors(path)
    names = {"fc1.weight": "router.weight", "fc1.bias": "router.bias", "wg.weight": "router.weight",
             "wg.bias": "router.bias", "router.weight": "router.weight", "router.bias": "router.bias"}
    out = {names[k]: v for k, v in state.items() if k in names}
    unknown = sorted(k for k in state if k not in names)
    if unknown or "router.weight" not in out:
        raise CheckpointError(f"{path}: expected fc1.weight [E, d] and fc1.bias [E] (the official router), "
                              f"found {sorted(state)}" + (f"; unknown {unknown}" if unknown else ""))
    weight = out["router.weight"]
    if weight.dim() != 2:
        raise CheckpointError(f"{path}: router weight has shape {tuple(weight.shape)}, expected [num_experts, hidden]")
    bias = out.get("router.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    if bias.shape != (weight.shape[0],):
        raise CheckpointError(f"{path}: router bias has shape {tuple(bias.shape)}, expected [{weight.shape[0]}]")
    return {"router.weight": weight.float().contiguous(), "router.bias": bias.float().contiguous()}


def convert_router(src: str, out: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Write the router as safetensors. `out` is a .safetensors file, or a folder (router.safetensors inside)."""
    state = read_router(src)
    if not out.endswith(".safetensors"):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "router.safetensors")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    num = state["router.weight"].shape[0]
    labels = ",".join(MODALITIES) if num == len(MODALITIES) else ""
    tmp = out + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.basename(src), "modalities": labels})
    os.replace(tmp, out)
    return out, state


def load_router(model, path: str) -> None:
    """Put a router file (ours or official) into a Med-MoE model's shared router."""
    state = load_file(path) if path.endswith(".safetensors") else read_router(path)
    if model.router is None:
        raise CheckpointError("this model has no shared router (dense, or moe.router_sharing='per_layer')")
    if state["router.weight"].shape != model.router.weight.shape:
        raise CheckpointError(f"{path}: router weight {tuple(state['router.weight'].shape)} does not fit the model's "
                              f"{tuple(model.router.weight.shape)} (experts x hidden size)")
    with torch.no_grad():
        model.router.weight.copy_(state["router.weight"])
        model.router.bias.copy_(state["router.bias"])
