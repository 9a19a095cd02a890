"""Host-to-device copies that never make the host wait. A copy from pageable memory to a GPU runs
in stream order and returns only once it is done, so the host would wait for every kernel queued
before it (a whole prefill or decode step); through pinned memory the copy is queued like a
kernel and the host goes on."""

from __future__ import annotations

import torch


def to_device(data, device: torch.device) -> torch.Tensor:
    """`data` on `device`: a list of ints (as int64), a tensor, or tensors to concatenate along
    their first dimension (tensors already on a GPU, as a Python caller may pass, are copied there
    directly)."""
    device = torch.device(device)
    tensors = isinstance(data, (list, tuple)) and len(data) > 0 and isinstance(data[0], torch.Tensor)
    if not _on_host(data, tensors):
        return torch.cat([t.to(device) for t in data]) if tensors else data.to(device)
    if device.type != "cuda":
        host = torch.cat(list(data)) if tensors else data if isinstance(data, torch.Tensor) else torch.tensor(data)
        return host.to(device)
    if tensors:
        host = torch.empty((sum(t.shape[0] for t in data), *data[0].shape[1:]), dtype=data[0].dtype, pin_memory=True)
        torch.cat(list(data), out=host)
    else:
        host = (data if isinstance(data, torch.Tensor) else torch.tensor(data)).pin_memory()
    return host.to(device, non_blocking=True)


def _on_host(data, tensors: bool) -> bool:
    if tensors:
        return all(t.device.type == "cpu" for t in data)
    return not isinstance(data, torch.Tensor) or data.device.type == "cpu"
