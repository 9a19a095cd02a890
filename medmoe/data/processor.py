"""Text + images -> model inputs. Shared by training, evaluation, generation and serving,
so every path tokenises and preprocesses the same way."""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ..config import IMAGE_TOKEN, VisionConfig
from ..errors import DataError
from .images import load_image, preprocess, random_view
from .templates import IGNORE_INDEX, Encoded, Turn, encode

PROCESSOR_FILE = "processor_config.json"


def prepare_tokenizer(tokenizer):
    """Add the `<image>` placeholder and a pad token. The LLM's embedding matrix is not resized:
    image positions are filled with projected image features before the LLM sees them."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class MedMoEProcessor:
    def __init__(self, tokenizer, vision: VisionConfig, template: str = "medmoe", system: str | None = None):
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.vision = vision
        self.template = template
        self.system = system

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def image_tensor(self, image, augment: bool = False) -> torch.Tensor:
        """[3, size, size] for the tower; `augment`: of a random view of the image (training only)."""
        image = load_image(image)
        if augment:
            image = random_view(image, self.vision.image_mean)
        return preprocess(image, self.vision.image_size, self.vision.image_mean, self.vision.image_std)

    def encode(self, turns: list[Turn], template: str | None = None, check: bool = False) -> Encoded:
        """check: also tokenise the full text at once and set `Encoded.aligned` (see templates.py)."""
        return encode(self.tokenizer, turns, template or self.template, self.image_token_id, self.num_image_tokens,
                      self.system, check=check)

    def prompt(self, question: str, has_image: bool) -> str:
        """The paper's evaluation prompt: `<image>\\n{question}` when there is an image."""
        if has_image and IMAGE_TOKEN not in question:
            return f"{IMAGE_TOKEN}\n{question}"
        return question

    def answer_start_ids(self, answers: Sequence[str]) -> list[int]:
        """The token each answer starts with where the template places an answer (after the
        assistant's turn opens): the first token of a generated answer that spells it. Distinct ids,
        in the order of `answers`."""
        ids: list[int] = []
        for answer in answers:
            encoded = self.encode([Turn("?", answer=answer)])
            first = next(t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX)
            if first not in ids:
                ids.append(first)
        return ids

    def pad(self, encoded: Sequence[Encoded], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Dynamic padding to the longest sequence in the batch."""
        longest = max(len(e.input_ids) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            cols = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(e.input_ids)
            labels[row, cols] = torch.tensor(e.labels)
            mask[row, cols] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __call__(self, questions: Sequence[str], images: Sequence | None = None, padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Generation inputs for a batch of questions, each with zero or more images.

        images[i] is None, one image (path, bytes or PIL), or a list of images, in the order of the
        `<image>` placeholders in questions[i] (one is added in front when the question has none).
        """
        images = list(images) if images is not None else [None] * len(questions)
        if len(images) != len(questions):
            raise DataError(f"{len(questions)} questions but {len(images)} image entries")
        encoded, pixels = [], []
        for question, imgs in zip(questions, images):
            imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, (list, tuple)) else [imgs])
            text = self.prompt(question, has_image=bool(imgs)) if len(imgs) <= 1 else question
            if text.count(IMAGE_TOKEN) != len(imgs):
                raise DataError(f"question has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders but {len(imgs)} images were given")
            encoded.append(self.encode([Turn(text, None)]))
            pixels.extend(self.image_tensor(img) for img in imgs)
        batch = self.pad(encoded, padding_side=padding_side)
        batch.pop("labels")
        batch["pixel_values"] = torch.stack(pixels) if pixels else None
        return batch

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def save_pretrained(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)
        self.save_settings(directory)

    def save_settings(self, directory: str) -> None:
        """The template and system line only (for delta checkpoints, whose tokenizer is the base's)."""
        with open(os.path.join(directory, PROCESSOR_FILE), "w") as f:
            json.dump({"template": self.template, "system": self.system}, f, indent=2)

    def load_settings(self, directory: str) -> None:
        path = os.path.join(directory, PROCESSOR_FILE)
        if os.path.exists(path):
            with open(path) as f:
                settings = json.load(f)
            self.template = settings.get("template", self.template)
            self.system = settings.get("system", self.system)

    @classmethod
    def from_pretrained(cls, directory: str, vision: VisionConfig) -> "MedMoEProcessor":
        from transformers import AutoTokenizer

        settings = {}
        path = os.path.join(directory, PROCESSOR_FILE)
        if os.path.exists(path):
            with open(path) as f:
                settings = json.load(f)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(tokenizer, vision, template=settings.get("template", "medmoe"), system=settings.get("system"))
