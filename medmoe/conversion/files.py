"""Reading checkpoint files safely: safetensors, or pickle (`.bin`, `.pth`) through
`torch.load(weights_only=True)` only. A pickle that needs to run code to load is refused,
never executed: opening a checkpoint must not be able to run someone else's program."""

from __future__ import annotations

import json
import os
import pickle

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _unreadable(path: str, err: Exception) -> CheckpointError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{path}: cannot be read ({reason}); the file is truncated or corrupt: copy or download it again")


def load_pickle(path: str) -> dict[str, torch.Tensor]:
    """A plain dict of tensors from a torch pickle, with weights_only=True (no code runs)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except EOFError as err:
        raise _unreadable(path, err) from None
    except RuntimeError as err:
        if "PytorchStreamReader" in str(err) or "zip archive" in str(err):  # a cut-off torch.save zip
            raise _unreadable(path, err) from None
        raise _refused(path, err) from None
    except (pickle.UnpicklingError, AttributeError, TypeError) as err:
        raise _refused(path, err) from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]  # torch.save({'state_dict': ...}) wrappers
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found {type(data).__name__}")
    return dict(data)


def _refused(path: str, err: Exception) -> CheckpointError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"{path}: refused. Loading this pickle would need to run code it names ({reason}); medmoe only loads "
        "pickles that hold plain tensors (torch.load(weights_only=True)). If you trust the file, re-save its "
        "tensors as safetensors yourself (safetensors.torch.save_file(state_dict, 'model.safetensors')) "
        "and convert that.")


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:  # a cut-off download: header or data shorter than it says
            raise _unreadable(path, err) from None
    return load_pickle(path)


def weight_files(folder: str) -> list[str]:
    """The weight files of a Hugging Face style folder: sharded index, single file, safetensors first."""
    for index in (SAFE_INDEX, BIN_INDEX):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{path}: not a valid index file ({err})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise CheckpointError(f"{path} lists shards that are not in {folder}: {missing}")
            return [os.path.join(folder, f) for f in files]
    names = sorted(os.listdir(folder))
    for pattern in (".safetensors", ".bin"):
        found = [os.path.join(folder, n) for n in names if n.endswith(pattern) and not n.startswith(".")
                 and (n.startswith("model") or n.startswith("pytorch_model"))]
        if found:
            return found
    hint = ""
    if any(n.startswith("global_step") for n in names):
        hint = (" It holds DeepSpeed `global_step*` states only: run the `zero_to_fp32.py` script DeepSpeed wrote "
                "beside them to get pytorch_model.bin, then convert that folder.")
    if "adapter_config.json" in names or "non_lora_trainables.bin" in names:
        hint = (" It is a LoRA adapter folder (adapter_config.json / non_lora_trainables.bin): merge it into its base "
                "model first (peft's merge_and_unload, then save_pretrained) and convert the merged folder.")
    raise CheckpointError(f"{folder}: no model weights (model*.safetensors, pytorch_model*.bin or an index file).{hint}")


def load_folder(folder: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        part = load_tensors(path)
        clash = set(part) & set(state)
        if clash:
            raise CheckpointError(f"{path} repeats tensors already read from another shard: {sorted(clash)[:5]}")
        state.update(part)
    return state
