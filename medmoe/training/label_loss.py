"""Image-level labels as an auxiliary loss in phases 1 and 2: what the tower phase (tower.py)
teaches the tower before phase 1, taught to the projector (and a trained tower) while the phase
trains, from the same labels (data/labels.py: modality, organ, SLAKE's structures, MedMNIST
classes, PathVQA's findings, read from the phase's own training records).

With `label_loss_weight > 0`, each step the image tokens the projector made for the batch are
averaged and one linear head per label family (`label_heads`, d -> the family's classes, trained
with the phase, dropped before the model is saved: image_loss.py) predicts each image's labels.
The loss is the tower phase's `heads_loss`: the mean over the families of their cross-entropy
(binary for the multi-label structures), each over the batch's images labelled in that family:

    loss = weight * mean over families f of CE_f(head_f(mean of the image's tokens), label_f)

An image without a label in a family adds nothing to that family's term. Labels are computed
once, before the phase, and identically again on resume.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.labels import FAMILIES, image_labels
from ..errors import ConfigError
from .image_loss import ProjectorHeadLoss, check_phase
from .tower import heads_loss, label_heads, target_matrix

HEAD = "label_heads"  # the heads' attribute on the model while a phase trains them


class LabelLoss(ProjectorHeadLoss):
    """The loss of one phase: `attach` puts the heads on the model and watches the projector,
    `__call__(batch)` gives {"label_loss": weighted loss}, `remove` takes both away."""

    head_name, what = HEAD, "the label loss"

    def __init__(self, records: Sequence, weight: float, families: Sequence[str] = FAMILIES, min_count: int = 5):
        super().__init__(records)
        labels = image_labels(records, families, min_count)
        if not labels.labels:
            raise ConfigError(f"label_loss_weight: the phase's data give no label family ({', '.join(families)}) "
                              f"with two classes of at least label_loss_min_count={min_count} images: add "
                              "labelled data, lower label_loss_min_count, or set label_loss_weight=0")
        self.classes = labels.classes
        self.targets, self.layout = target_matrix(labels)
        self.row = {image: i for i, image in enumerate(labels.images)}
        self.weight = weight

    def counts(self) -> dict[str, int]:
        """Labelled images per family."""
        return {f: int((self.targets[:, s.start] != -100).sum()) for f, s in self.layout.items()}

    def attach(self, model, seed: int = 0) -> None:
        """The heads (seeded apart from the global generator) and the projector hook."""
        super().attach(model, label_heads(model.config.hidden_size, self.classes, torch.Generator().manual_seed(seed)))

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        pooled, images = self.pooled(batch)
        if self.targets.device != pooled.device:  # attached before the trainer moved the model
            self.targets = self.targets.to(pooled.device)
        # Made on the host, copied without waiting for the device (a plain copy to a GPU waits for it).
        rows = torch.tensor([self.row[image] for image in images]).to(pooled.device, non_blocking=True)
        loss = heads_loss(getattr(model, HEAD), self.layout, pooled.float(), self.targets[rows])
        return {"label_loss": self.weight * loss}


def setup(model, records: Sequence, weight: float, families: Sequence[str], min_count: int, phase: str, dist,
          seed: int = 0) -> LabelLoss:
    """The label loss of one phase, attached to `model` (before its parameters are grouped)."""
    check_phase("label_loss_weight", phase, dist, "the label loss")
    loss = LabelLoss(records, weight, families, min_count)
    loss.attach(model, seed)
    return loss
