"""Closed yes/no questions built from what the training splits already say about each image
(the image-level labels of data/labels.py): the `label-questions:<source>` data source.

For every image of the source and every family it is labelled in, two questions: one whose
answer is yes (its own class, or one of its SLAKE structures) and one whose answer is no (another
class of the family, or a structure not found in the image, drawn with a seeded generator). The
answer can only come from the image: the same question is asked with yes about one image and with
no about another, so a model that answers from the question alone gets half of them right.

    modality     "Is this a CT scan?"                   CT, MRI, X-Ray, Pathology
    organ        "Is this an image of the chest?"       VQA-RAD's organ, SLAKE's location, PathVQA's
    structures   "Does the picture contain liver?"      SLAKE's detection.json

To train on them, pass training records: the labels then say nothing a training question has not
said. As a probe of whether a model reads the image (`medmoe data label-questions DIR --split
test`), pass a test split: its questions come from that split's own metadata.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from .labels import image_labels
from .records import Record

FAMILIES = ("modality", "organ", "structures")
MODALITY_NAMES = {"CT": "a CT scan", "MRI": "an MRI", "X-Ray": "an x-ray", "Pathology": "a pathology slide"}
QUESTIONS = {
    "modality": lambda name: f"Is this {MODALITY_NAMES.get(name, name)}?",
    "organ": lambda name: f"Is this an image of the {name}?",
    "structures": lambda name: f"Does the picture contain {name}?",
}


def _yes_and_no(value, classes: list[str], rng: random.Random) -> tuple[str, str] | None:
    """(a class the image has, one it has not), or None where the family offers no such pair."""
    present = value if isinstance(value, list) else [value]
    absent = [c for c in classes if c not in present]
    if not present or not absent:
        return None
    return rng.choice(present), rng.choice(absent)


def label_questions(records: Sequence[Record], families: Sequence[str] = FAMILIES, seed: int = 0,
                    min_count: int = 5) -> list[Record]:
    """Two closed questions (yes, no) per image of `records` and labelled family, in image order."""
    labels = image_labels(records, [f for f in families if f in FAMILIES], min_count)
    first = {}
    for r in records:
        if r.image:
            first.setdefault(r.image, r)
    rng = random.Random(seed)
    out = []
    for i, image in enumerate(labels.images):
        source = first[image]
        stem = Path(image).parent.name if source.dataset == "slake" else Path(image).stem
        for family, values in labels.labels.items():
            pair = _yes_and_no(values[i], labels.classes[family], rng) if values[i] else None
            if pair is None:
                continue
            for name, answer in zip(pair, ("yes", "no")):
                out.append(Record(id=f"label-question-{source.dataset}-{stem}-{family}-{answer}", image=image,
                                  question=QUESTIONS[family](name), answer=answer, answer_type="CLOSED",
                                  modality=source.modality, dataset=f"{source.dataset}-label-questions",
                                  split=source.split, language="en", meta={"question_type": family}))
    return out
