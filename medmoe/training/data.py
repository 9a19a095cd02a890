"""What a training phase reads: records (question, answer, image, modality) -> encoded samples.

Records come from the data layer (`medmoe.data.records`); this module only turns them into the
loop's samples with the phase's template: phase 1 "plain" (`<image>` + caption), phases 2-3
"medmoe" (`USER: <image>\\n{q} ASSISTANT: {a}<eos>`). Samples longer than max_length are cut on
the answer side; a sample whose image tokens would not fit is an error, not a silent skip.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..config import IMAGE_TOKEN
from ..data.templates import Turn
from ..errors import DataError


def field(record: Any, name: str, default=None):
    """Records may be objects (data layer's Record) or plain dicts (tests, JSONL)."""
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


def question_text(record) -> str:
    q = field(record, "question") or ""
    if field(record, "image") is not None and IMAGE_TOKEN not in q:
        return f"{IMAGE_TOKEN}\n{q}"
    return q


class EncodedDataset(Dataset):
    """records -> {"input_ids", "labels", "pixel_values" [1,3,H,W] or None, "id"}, encoded lazily."""

    def __init__(self, records: Sequence, processor, template: str = "medmoe", max_length: int = 2048):
        self.records = list(records)
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.pad_id = processor.tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = field(r, "image")
        question = question_text(r) if self.template != "plain" else (IMAGE_TOKEN if image is not None else "")
        answer = field(r, "caption") if self.template == "plain" and field(r, "caption") else field(r, "answer", "")
        enc = self.processor.encode([Turn(question, str(answer))], template=self.template)
        ids, labels = enc.input_ids[: self.max_length], enc.labels[: self.max_length]
        n_image = ids.count(self.processor.image_token_id)
        if image is not None and n_image != self.processor.num_image_tokens:
            raise DataError(f"sample {field(r, 'id', i)}: max_length={self.max_length} cuts its image tokens; raise max_length")
        pixels = self.processor.image_tensor(image).unsqueeze(0) if image is not None else None
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "id": field(r, "id", str(i))}


def load_records(sources: Sequence[str], split: str = "train") -> list:
    """Records from each source: "sample" (the bundled VQA-RAD sample), a JSONL records file,
    or a dataset name the data layer knows (vqa-rad, slake, pathvqa)."""
    from ..data import records as rec

    out = []
    for source in sources:
        if source == "sample":
            import os

            out.extend(rec.read_records(os.path.join(rec.sample_dataset_dir(), f"{split}.jsonl")))
        elif source.endswith(".jsonl"):
            out.extend(rec.read_records(source))
        else:
            loader = getattr(rec, "load_dataset", None)
            if loader is None:
                raise DataError(f"data source {source!r}: use 'sample' or a records .jsonl file")
            out.extend(loader(source, split))
    if not out:
        raise DataError(f"data sources {list(sources)} ({split}) hold no records")
    return out
