"""Answers contrasted with another image: an auxiliary loss that asks the model to need the image.

The shuffled-image control (`medmoe eval --shuffle-images`) measures how much of a score comes
from the image: the same questions asked about other images. This loss trains against what that
control measures. Each step, the batch's questions are asked again with its images rotated by one
(each question gets the previous sample's image), and the answer loss of that pass is pushed up,
to a cap:

    loss = -weight * min(answer loss with the rotated images, cap)

The ordinary answer loss keeps the right answers likely with the right images; this term makes
them unlikely with wrong ones, which only a model that reads the image can do. The cap (nats per
answer token) stops the term once wrong-image answers are unlikely enough, so it cannot grow
without bound. Questions whose answer is the same for both images (many yes/no questions) are
pushed too: the cap bounds that noise.

It costs one more forward and backward pass a step (1.7x the step for nano's experts on a CPU). It has no head and trains
whatever the phase trains. Rotating needs one image per sample: batches with fewer than two images,
or with samples without an image, add nothing.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


class ImageContrast:
    """The trainer's `extra_losses(model, batch)` term {"image_contrast": value} (negative)."""

    def __init__(self, weight: float, cap: float):
        self.weight, self.cap = weight, cap

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        pixels = batch.get("pixel_values")
        if pixels is None or len(pixels) < 2 or len(pixels) != len(batch["input_ids"]):
            return {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pixels.roll(1, dims=0), labels=batch["labels"], return_logits=False)
        return {"image_contrast": -self.weight * out.loss.clamp(max=self.cap)}


def setup(weight: float, cap: float, where: str, dist) -> list[ImageContrast]:
    """The term as a list for the trainer's losses (empty at weight 0). It goes after any loss that
    reads the projector's tokens (those keep the last forward's: this pass's would be the wrong images)."""
    if weight <= 0:
        return []
    if dist.world > 1:
        raise ConfigError(f"{where}.image_contrast_weight > 0 runs in one process (its second pass is outside "
                          "the DDP/FSDP forward): train without torchrun, or set it to 0")
    return [ImageContrast(weight, cap)]
