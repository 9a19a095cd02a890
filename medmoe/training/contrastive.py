"""Contrastive image-caption alignment: a CLIP-style loss beside the language-model loss.

With `contrastive_weight > 0` (phases 1 and 2), every training image is paired with its metadata
caption (data/captions.py), which the frozen MiniLM sentence encoder (vision/text_encoder.py)
turns into a unit vector once, before the phase. Each step, the image tokens the projector made
for the batch are averaged, mapped by a linear head (d -> 384, `contrastive_head`, trained with
the phase and dropped before the model is saved) and normalised; the loss is the symmetric
InfoNCE of CLIP, image -> caption and caption -> image, at a fixed temperature:

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

from ..errors import ConfigError, DataError

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


class ContrastiveAlignment:
    """The loss of one phase: `attach` puts the head on the model and watches the projector,
    `__call__(batch)` gives {"contrastive_loss": weighted loss}, `remove` takes both away."""

    def __init__(self, records: Sequence, text_encoder, weight: float, temperature: float):
        if temperature <= 0:
            raise ConfigError(f"contrastive_temperature={temperature}: must be above 0")
        captions = image_captions(records)
        self.image_of: dict[str, str] = {}
        for r in records:
            if r.image and self.image_of.setdefault(r.id, r.image) != r.image:
                raise DataError(f"record id {r.id!r} names two images ({self.image_of[r.id]}, {r.image}); "
                                "contrastive alignment needs unique ids: rename one source's records")
        texts = sorted(set(captions.values()))
        caption_index = {t: i for i, t in enumerate(texts)}
        images = sorted(captions)
        self.image_index = {image: i for i, image in enumerate(images)}
        self.caption_of_image = torch.tensor([caption_index[captions[image]] for image in images])
        self.caption_emb = text_encoder.encode(texts).detach()
        self.weight, self.temperature = weight, temperature
        self._tokens: torch.Tensor | None = None
        self._hook = None

    def attach(self, model, seed: int = 0) -> None:
        """The head (d -> text dim, seeded apart from the global generator) and the projector hook."""
        head = nn.Linear(model.config.hidden_size, self.caption_emb.shape[1], bias=False)
        with torch.no_grad():
            head.weight.normal_(0.0, model.config.hidden_size ** -0.5, generator=torch.Generator().manual_seed(seed))
        setattr(model, HEAD, head.to(model.device))
        self.caption_emb = self.caption_emb.to(model.device)
        self._hook = model.projector.register_forward_hook(self._keep)

    def head_parameters(self, model) -> dict[str, nn.Parameter]:
        """The head's parameters under their names in the model (the parameter group `contrastive_head`)."""
        return {f"{HEAD}.{name}": p for name, p in getattr(model, HEAD).named_parameters()}

    def _keep(self, module, inputs, output) -> None:
        self._tokens = output

    def remove(self, model) -> None:
        if self._hook is not None:
            self._hook.remove()
        if hasattr(model, HEAD):
            delattr(model, HEAD)
        self._hook = self._tokens = None

    def batch_ids(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, caption index) of each image of a batch, in pixel_values order."""
        images = [self.image_of[i] for i in ids if i in self.image_of]
        image_ids = torch.tensor([self.image_index[image] for image in images])
        return image_ids, self.caption_of_image[image_ids]

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError("contrastive alignment: the forward pass made no image tokens (no images in the batch?)")
        image_ids, caption_ids = self.batch_ids(batch["ids"])
        if len(image_ids) != tokens.shape[0]:
            raise DataError(f"contrastive alignment: {tokens.shape[0]} images in the batch but {len(image_ids)} "
                            "with a known caption")
        image_emb = F.normalize(getattr(model, HEAD)(tokens.mean(1)).float(), dim=-1)
        device = image_emb.device
        duplicates = duplicate_mask(image_ids.to(device), caption_ids.to(device))
        loss = clip_loss(image_emb, self.caption_emb[caption_ids.to(device)], self.temperature, duplicates)
        return {"contrastive_loss": self.weight * loss}


def setup(model, records: Sequence, weight: float, temperature: float, phase: str, dist, seed: int = 0,
          text_encoder=None) -> ContrastiveAlignment:
    """The alignment of one phase, attached to `model` (before its parameters are grouped)."""
    if phase not in ("1", "2"):
        raise ConfigError(f"phase{phase}.contrastive_weight: contrastive alignment trains the projector (and a "
                          "trained tower) in phase 1 or 2; phase 3 freezes them: set it to 0 there")
    if dist.world > 1:
        raise ConfigError(f"phase{phase}.contrastive_weight > 0 runs in one process; its head is outside the "
                          "DDP/FSDP forward: train this phase without torchrun, or set it to 0")
    with torch.random.fork_rng(devices=[]):  # loading the encoder leaves the phase's random stream as it was
        if text_encoder is None:
            from ..vision.text_encoder import load_minilm

            text_encoder = load_minilm(dist.device)
        alignment = ContrastiveAlignment(records, text_encoder, weight, temperature)
    alignment.attach(model, seed)
    return alignment
