"""Several processes through PyTorch's own engines, nothing home-made:

- `torchrun --nproc_per_node N -m medmoe train ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
  `setup()` starts the process group (NCCL on GPUs, gloo on CPU).
- "ddp": `DistributedDataParallel` (every GPU holds the model; gradients all-reduced).
- "fsdp": FSDP2 `fully_shard` on each decoder layer and then the whole model, for models that do
  not fit one GPU (parameters, gradients and optimizer state sharded).
Without torchrun everything runs in one process on the best device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def single_process(device: torch.device | None = None) -> DistInfo:
    return DistInfo(device=device or best_device())


def setup() -> DistInfo:
    """Start the process group when launched by torchrun; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return single_process()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def wrap(model: torch.nn.Module, dist: DistInfo, strategy: str = "ddp"):
    """The model the training loop runs forward/backward through."""
    model.to(dist.device)
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from ..moe.upcycle import decoder_layers

        for layer in decoder_layers(model.language_model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Top-1 routing can leave a ModuleExperts copy without tokens in a step: allow unused parameters then.
    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=getattr(model, "is_moe", False))


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model under FSDP2 (its parameters are DTensor shards)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        tdist.barrier()


def cleanup() -> None:
    """End a torchrun process group, all ranks together (a no-op in a single process)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
