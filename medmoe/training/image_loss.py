"""What the auxiliary image losses of phases 1 and 2 share (contrastive.py, label_loss.py): a head
fed the image tokens the projector made for the batch, averaged per image.

The head is an attribute of the model while the phase trains it (its own parameter group, named
like the attribute), so checkpoints hold it and `--resume` is exact; `remove` takes it away before
the model is saved. A forward hook on the projector keeps the batch's image tokens. The head is
outside the DDP/FSDP forward, so these losses run in one process, and only where the projector
trains (phases 1 and 2).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError


class ProjectorHeadLoss:
    """`attach` puts the head on the model and hooks the projector, `pooled(batch)` gives the
    batch's averaged image tokens and their images, `remove` takes both away. Subclasses set
    `head_name` (the model attribute and parameter group) and `what` (for messages), and are
    called as the trainer's `extra_losses(model, batch)`."""

    head_name = ""
    what = ""

    def __init__(self, records: Sequence):
        self.image_of: dict[str, str] = {}
        for r in records:
            if r.image and self.image_of.setdefault(r.id, r.image) != r.image:
                raise DataError(f"record id {r.id!r} names two images ({self.image_of[r.id]}, {r.image}); "
                                f"{self.what} needs unique ids: rename one source's records")
        self._tokens: torch.Tensor | None = None
        self._hook = None

    def attach(self, model, head: nn.Module) -> None:
        setattr(model, self.head_name, head.to(model.device))
        self._hook = model.projector.register_forward_hook(self._keep)

    def head_parameters(self, model) -> dict[str, nn.Parameter]:
        """The head's parameters under their names in the model (the parameter group `head_name`)."""
        return {f"{self.head_name}.{name}": p for name, p in getattr(model, self.head_name).named_parameters()}

    def _keep(self, module, inputs, output) -> None:
        self._tokens = output

    def remove(self, model) -> None:
        if self._hook is not None:
            self._hook.remove()
        if hasattr(model, self.head_name):
            delattr(model, self.head_name)
        self._hook = self._tokens = None

    def pooled(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """The batch's image tokens averaged per image [n, d], and the images, in pixel_values order."""
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError(f"{self.what}: the forward pass made no image tokens (no images in the batch?)")
        images = [self.image_of[i] for i in batch["ids"] if i in self.image_of]
        if len(images) != tokens.shape[0]:
            raise DataError(f"{self.what}: {tokens.shape[0]} images in the batch but {len(images)} records "
                            "with an image")
        return tokens.mean(1), images


def check_phase(setting: str, phase: str, dist, what: str) -> None:
    """ConfigError unless the phase trains the projector (1 or 2) in one process."""
    if phase not in ("1", "2"):
        raise ConfigError(f"phase{phase}.{setting}: {what} trains the projector (and a trained tower) in phase 1 "
                          "or 2; phase 3 freezes them: set it to 0 there")
    if dist.world > 1:
        raise ConfigError(f"phase{phase}.{setting} > 0 runs in one process; its head is outside the "
                          "DDP/FSDP forward: train this phase without torchrun, or set it to 0")


def combined(losses: Sequence[Callable]) -> Callable | None:
    """One `extra_losses` for the trainer: every loss's named terms (None when there is none)."""
    if not losses:
        return None
    return lambda model, batch: {name: value for loss in losses for name, value in loss(model, batch).items()}
