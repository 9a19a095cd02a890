"""Image-level labels from what the training splits already say about each image, for the tower
phase (training/tower.py). One label per image and family (a set for `structures`):

- `modality`: CT, MRI, X-Ray, Pathology (the records' modality; unknown images unlabelled),
- `organ`: VQA-RAD's image_organ, SLAKE's location, PathVQA's answers to "where is this?",
- `structures`: the names in SLAKE's detection.json (several per image),
- `class`: MedMNIST class names, one class set per dataset ("pneumoniamnist: normal"),
- `finding`: PathVQA's answers to "what does this image show?".

Classes held by fewer than `min_count` images are dropped (their images stay unlabelled in that
family): a class seen once can be neither learnt nor tested. Class order is sorted, so a label
index means the same thing in every run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .captions import ORGAN_NAMES, detected_structures, qa_facts
from .records import UNKNOWN, Record

FAMILIES = ("modality", "organ", "structures", "class", "finding")
MULTI_LABEL = ("structures",)


@dataclass
class ImageLabels:
    images: list[str]
    labels: dict[str, list]  # family -> per image: a class name, a list of names (multi-label), or None
    classes: dict[str, list[str]]  # family -> class names, sorted

    def counts(self) -> dict[str, int]:
        """Labelled images per family."""
        return {f: sum(v is not None for v in values) for f, values in self.labels.items()}


def organ_name(organ: str) -> str:
    """"ABD", "Abdomen" -> "abdomen"; "Chest_lung" -> "chest" (captions' spelling)."""
    organ = str(organ or "").strip()
    return ORGAN_NAMES.get(organ, organ.replace("_", " ").lower())


def _facts(group: list[Record], image: str) -> dict:
    first = group[0]
    facts = {"modality": first.modality if first.modality != UNKNOWN else None,
             "organ": organ_name(first.meta.get("organ", "")) or None, "structures": None, "class": None,
             "finding": None}
    if first.dataset == "slake":
        facts["structures"] = detected_structures(Path(image).parent / "detection.json") or None
    if first.dataset == "pathvqa":
        findings, organ = qa_facts(group)
        facts["finding"] = findings[0].lower() if findings else None
        facts["organ"] = organ.lower() if organ else None
    if first.choices and first.meta.get("label_name"):  # MedMNIST classification
        facts["class"] = f"{first.dataset}: {first.meta['label_name']}"
    return facts


def image_labels(records: Sequence[Record], families: Sequence[str] = FAMILIES, min_count: int = 5) -> ImageLabels:
    """Labels of every distinct image of `records` (absolute image paths: SLAKE's detection.json
    is read beside its image). Families with fewer than two classes left are dropped."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ConfigError(f"tower label family {unknown[0]!r} unknown; choose from {', '.join(FAMILIES)}")
    by_image: dict[str, list[Record]] = {}
    for r in records:
        if r.image:
            by_image.setdefault(r.image, []).append(r)
    images = list(by_image)
    facts = [_facts(by_image[image], image) for image in images]
    labels, classes = {}, {}
    for family in families:
        values = [f[family] for f in facts]
        if family in MULTI_LABEL:
            counts = Counter(name for v in values if v for name in v)
            keep = sorted(c for c, n in counts.items() if n >= min_count)
            values = [[n for n in v if n in keep] or None if v else None for v in values]
        else:
            counts = Counter(v for v in values if v is not None)
            keep = sorted(c for c, n in counts.items() if n >= min_count)
            values = [v if v in keep else None for v in values]
        if len(keep) >= 2:
            labels[family], classes[family] = values, keep
    return ImageLabels(images, labels, classes)
