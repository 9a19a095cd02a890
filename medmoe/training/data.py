"""Where a phase's records come from. A recipe lists data sources; each is one of
- "sample": the bundled VQA-RAD sample (`medmoe/assets/sample`, a few CC0 images),
- a prepared dataset folder (`medmoe data prepare ...` output: {split}.jsonl + dataset.json),
- a records file (.jsonl canonical records, or .json in the LLaVA format),
- "captions:<source>": one caption per image of <source>, built from its metadata (phase 1).
- "label-questions:<source>": closed yes/no questions about each image of <source>, built from its
  image-level labels (modality, organ, SLAKE's structures; `data/label_questions.py`).
Any of them may end in "*N" (a whole number) to repeat its records N times per epoch, so that a
small set is not drowned by a large one: ["data/vqa-rad*3", "data/pathvqa"].
The encoding itself (templates, image tokens, truncation) is the data layer's `VQADataset`.
`sample_weights` gives the per-sample weights of a phase's `balanced_sampling`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Sequence

from ..config import IMAGE_TOKEN
from ..data.dataset import Collate, VQADataset
from ..errors import DataError

__all__ = ["Collate", "VQADataset", "field", "question_text", "load_records", "build_dataset", "sample_weights"]


def field(record: Any, name: str, default=None):
    """Records are the data layer's Record objects; plain dicts are accepted too (tests)."""
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


def question_text(record) -> str:
    """The question turn as the paper prompts it: `<image>\\n{question}`."""
    q = field(record, "question") or ""
    if field(record, "image") and IMAGE_TOKEN not in q:
        return f"{IMAGE_TOKEN}\n{q}"
    return q


def _source_records(source: str, split: str) -> list:
    from ..data import records as rec

    if source == "sample":
        return rec.load_split(rec.sample_dataset_dir(), split)
    if os.path.isdir(source):
        return rec.load_split(source, split)
    if os.path.isfile(source):
        return [r for r in rec.read_records(source, resolve_images=True) if r.split == split or split == "any"]
    raise DataError(f"data source {source!r} not found: use 'sample', a prepared dataset folder "
                    "(medmoe data prepare ...), a records .jsonl file, or captions: or label-questions: "
                    "before one of those")


def split_repeat(source: str) -> tuple[str, int]:
    """"data/vqa-rad*3" -> ("data/vqa-rad", 3); a source without "*N" repeats once."""
    match = re.fullmatch(r"(.+)\*(\d+)", source)
    if match is None:
        if "*" in source and not os.path.exists(source):
            raise DataError(f"data source {source!r}: a repeat is a whole number after '*', e.g. 'data/vqa-rad*3'")
        return source, 1
    if int(match.group(2)) < 1:
        raise DataError(f"data source {source!r}: the repeat count must be at least 1")
    return match.group(1), int(match.group(2))


def load_records(sources: Sequence[str], split: str = "train") -> list:
    out = []
    for entry in sources:
        source, repeat = split_repeat(entry)
        if source.startswith("captions:"):
            from ..data.captions import build_captions

            records = build_captions(_source_records(source.split(":", 1)[1], split), image_root="/")
        elif source.startswith("label-questions:"):
            from ..data.label_questions import label_questions

            records = label_questions(_source_records(source.split(":", 1)[1], split))
        else:
            records = _source_records(source, split)
        out.extend(list(records) * repeat)
    if not out:
        raise DataError(f"data sources {list(sources)} hold no {split} records")
    return out


def build_dataset(sources: Sequence[str], processor, template: str, max_length: int, split: str = "train",
                  augment_images: bool = False) -> VQADataset:
    return records_dataset(load_records(sources, split), processor, template, max_length, augment_images)


def records_dataset(records: list, processor, template: str, max_length: int, augment_images: bool = False) -> VQADataset:
    # A tokenisation mismatch only means the answer's first token merges differently with the
    # prompt; the labels still cover the answer, so training keeps such samples.
    return VQADataset(records, processor, template=template, max_length=max_length, allow_mismatch=True,
                      augment_images=augment_images)


def sample_weights(records: Sequence, mode: str) -> list[float] | None:
    """One sampling weight per record for `balanced_sampling` (None for "off").

    "dataset": every dataset (the record's `dataset` field) gets the same total weight.
    "label": inside each classification dataset (records with `choices`), every class gets the
    same share of that dataset's total, which stays its size; other records keep weight 1. A
    skewed set (PneumoniaMNIST's 388 normal / 3,494 pneumonia) is then seen half and half."""
    if mode == "off":
        return None
    if mode not in ("dataset", "label"):
        raise DataError(f"balanced_sampling={mode!r}: use off, dataset or label")
    datasets = [field(r, "dataset") or "" for r in records]
    if mode == "dataset":
        sizes = Counter(datasets)
        return [len(records) / (len(sizes) * sizes[d]) for d in datasets]
    keys = [(d, field(r, "answer")) if field(r, "choices") else None for d, r in zip(datasets, records)]
    per_class = Counter(k for k in keys if k is not None)
    sizes = Counter(k[0] for k in keys if k is not None)
    classes = Counter(d for d, _ in per_class)
    return [1.0 if k is None else sizes[k[0]] / (classes[k[0]] * per_class[k]) for k in keys]
