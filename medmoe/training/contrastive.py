"""Contrastive image-caption alignment: a CLIP-style loss beside the language-model loss.

With `contrastive_weight > 0` (phases 1 and 2), every training image is paired with its metadata
caption (data/captions.py), which the frozen MiniLM sentence encoder (vision/text_encoder.py)
turns into a unit vector once, before the phase. Each step, the image tokens the projector made
for the batch are averaged, mapped by a linear head (d -> 384, `contrastive_head`, trained with
the phase and dropped before the model is saved: image_loss.py) and normalised; the loss is the
symmetric InfoNCE of CLIP, image -> caption and caption -> image, at a fixed temperature:

    loss = weight * (CE(sim / T, diag) + CE(sim.T / T, diag)) / 2,   sim = image_emb @ caption_emb.T

Two samples of one image (several questions per image in phase 2, a repeated source) or with the
same caption text (thousands of PneumoniaMNIST images read "Chest X-ray classified as
pneumonia.") are not negatives of each other: those pairs are masked out of the softmax.
The head lives on the model during the phase, so checkpoints hold it and `--resume` is exact; the
caption vectors are recomputed, identically, on resume.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .image_loss import ProjectorHeadLoss, check_phase

HEAD = "contrastive_head"  # the head's attribute on the model while a phase trains it


def duplicate_mask(image_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """[n, n] True where two different samples share an image or a caption: not negatives."""
    same = (image_ids[:, None] == image_ids[None, :]) | (caption_ids[:, None] == caption_ids[None, :])
    return same & ~torch.eye(len(image_ids), dtype=torch.bool, device=image_ids.device)


def clip_loss(image_emb: torch.Tensor, caption_emb: torch.Tensor, temperature: float,
              duplicates: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned unit vectors [n, k]; `duplicates` ([n, n], True:
    leave the pair out of both softmaxes) from `duplicate_mask`."""
    logits = image_emb.float() @ caption_emb.float().T / temperature
    if duplicates is not None:
        logits = logits.masked_fill(duplicates, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def image_captions(records: Sequence) -> dict[str, str]:
    """{image path: caption}: caption records (phase 1) give their own text; QA records (phase 2)
    the caption data/captions.py builds for their image."""
    from ..data.captions import build_captions

    out = {r.image: r.answer for r in records if r.image and r.split == "captions"}
    qa = [r for r in records if r.image and r.split != "captions" and r.image not in out]
    out.update({c.image: c.answer for c in build_captions(qa, image_root="/")})
    return out


class ContrastiveAlignment(ProjectorHeadLoss):
    """The loss of one phase: `attach` puts the head on the model and watches the projector,
    `__call__(batch)` gives {"contrastive_loss": weighted loss}, `remove` takes both away."""

    head_name, what = HEAD, "contrastive alignment"

    def __init__(self, records: Sequence, text_encoder, weight: float, temperature: float):
        if temperature <= 0:
            raise ConfigError(f"contrastive_temperature={temperature}: must be above 0")
        super().__init__(records)
        captions = image_captions(records)
        texts = sorted(set(captions.values()))
        caption_index = {t: i for i, t in enumerate(texts)}
        images = sorted(captions)
        self.image_index = {image: i for i, image in enumerate(images)}
        self.caption_of_image = torch.tensor([caption_index[captions[image]] for image in images])
        self.caption_emb = text_encoder.encode(texts).detach()
        self.weight, self.temperature = weight, temperature

    def attach(self, model, seed: int = 0) -> None:
        """The head (d -> text dim, seeded apart from the global generator, which it leaves as it
        was) and the projector hook."""
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws a first initialisation from it
            head = nn.Linear(model.config.hidden_size, self.caption_emb.shape[1], bias=False)
        with torch.no_grad():
            head.weight.normal_(0.0, model.config.hidden_size ** -0.5, generator=torch.Generator().manual_seed(seed))
        super().attach(model, head)

    def batch_ids(self, images: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, caption index) of each image of a batch."""
        image_ids = torch.tensor([self.image_index[image] for image in images])
        return image_ids, self.caption_of_image[image_ids]

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        pooled, images = self.pooled(batch)
        image_emb = F.normalize(getattr(model, HEAD)(pooled).float(), dim=-1)
        if self.caption_emb.device != image_emb.device:  # attached before the trainer moved the model
            self.caption_emb = self.caption_emb.to(image_emb.device)
        # Made on the host, copied without waiting for the device (a plain copy to a GPU waits for it).
        image_ids, caption_ids = (ids.to(image_emb.device, non_blocking=True) for ids in self.batch_ids(images))
        duplicates = duplicate_mask(image_ids, caption_ids)
        loss = clip_loss(image_emb, self.caption_emb[caption_ids], self.temperature, duplicates)
        return {"contrastive_loss": self.weight * loss}


def setup(model, records: Sequence, weight: float, temperature: float, phase: str, dist, seed: int = 0,
          text_encoder=None) -> ContrastiveAlignment:
    """The alignment of one phase, attached to `model` (before its parameters are grouped)."""
    check_phase("contrastive_weight", phase, dist, "contrastive alignment")
    with torch.random.fork_rng(devices=[]):  # loading the encoder leaves the phase's random stream as it was
        if text_encoder is None:
            from ..vision.text_encoder import load_minilm

            text_encoder = load_minilm(dist.device)
        alignment = ContrastiveAlignment(records, text_encoder, weight, temperature)
    alignment.attach(model, seed)
    return alignment
