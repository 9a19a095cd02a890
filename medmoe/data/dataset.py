"""Torch datasets over canonical records: encoded examples, collate with dynamic padding,
length-grouped batches, seeded shuffling and a weighted mixture of datasets.

    ds = VQADataset(load_split("prepared/vqa-rad", "train"), processor)
    sampler = LengthGroupedBatchSampler(ds.lengths(), batch_size=8, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=Collate(processor))
"""

from __future__ import annotations

import math
import sys
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..config import IMAGE_TOKEN, MODALITIES
from ..errors import DataError
from .records import Record
from .templates import Encoded, Turn


def record_turns(record: Record, template: str) -> list[Turn]:
    """The conversation of a record. The image placeholder leads the first question
    (`<image>\\n{q}`, the paper's prompt), or is the whole prompt for the plain template."""
    question = record.question
    if record.image and IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN if template == "plain" else f"{IMAGE_TOKEN}\n{question}"
    return [Turn(question, record.answer)] + [Turn(q, a) for q, a in record.turns]


class TokenizationMismatch(DataError):
    """A sample whose segment-wise tokenisation differs from tokenising its full text."""


class VQADataset(Dataset):
    """Records -> {"id", "input_ids", "labels", "pixel_values" [n_img,3,H,W] or None, "modality"}.

    Image paths must be absolute or relative to the working directory (`load_split` resolves them).
    allow_mismatch=False raises on a tokenisation mismatch naming the sample; True keeps the sample
    (its labels still cover exactly its answer tokens), counts it and prints its id once.
    """

    def __init__(self, records: Sequence[Record], processor, template: str | None = None, max_length: int | None = None,
                 allow_mismatch: bool = False, load_images: bool = True, augment_images: bool = False):
        self.records = list(records)
        self.processor = processor
        self.template = template or processor.template
        self.max_length = max_length
        self.allow_mismatch = allow_mismatch
        self.load_images = load_images
        self.augment_images = augment_images  # a random view of each image every time (images.random_view)
        self.mismatched: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, record: Record) -> Encoded:
        encoded = self.processor.encode(record_turns(record, self.template), template=self.template, check=True)
        if not encoded.aligned:
            self._mismatch(record.id)
        if self.max_length is not None and len(encoded.input_ids) > self.max_length:
            encoded = self._truncate(record, encoded)
        return encoded

    def _mismatch(self, sample_id: str) -> None:
        message = (f"sample {sample_id}: tokenization mismatch (tokenising the prompt and answer separately gives other "
                   f"ids than tokenising the whole text)")
        if not self.allow_mismatch:
            raise TokenizationMismatch(f"{message}; fix the text or allow mismatches (allow_mismatch=True / --allow-mismatch)")
        if sample_id not in self.mismatched:
            self.mismatched.add(sample_id)
            print(f"medmoe: {message}; kept ({len(self.mismatched)} so far)", file=sys.stderr)

    def _truncate(self, record: Record, encoded: Encoded) -> Encoded:
        image_id = self.processor.image_token_id
        if image_id in encoded.input_ids[self.max_length:]:
            raise DataError(f"sample {record.id}: {len(encoded.input_ids)} tokens; truncating to max_length={self.max_length} "
                            f"would cut image tokens; raise max_length")
        return Encoded(encoded.input_ids[: self.max_length], encoded.labels[: self.max_length], encoded.aligned)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        encoded = self.encode(record)
        pixels = None
        if record.image and self.load_images:
            pixels = self.processor.image_tensor(record.image, augment=self.augment_images).unsqueeze(0)
        return {"id": record.id, "input_ids": encoded.input_ids, "labels": encoded.labels, "pixel_values": pixels,
                "modality": record.modality}

    def check(self) -> list[str]:
        """Tokenise every sample once (no images) and return the ids that mismatch.
        Raises on the first one unless allow_mismatch. Cheap: run it before a long training."""
        for record in self.records:
            self.encode(record)
        return sorted(self.mismatched)

    def lengths(self) -> list[int]:
        """Approximate token counts for length grouping, without tokenising (about 4 characters
        per token, plus the image tokens)."""
        n_img = self.processor.num_image_tokens
        return [(len(r.question) + len(r.answer) + sum(len(q) + len(a) for q, a in r.turns)) // 4
                + (n_img if r.image else 0) for r in self.records]

    def modality_labels(self) -> list[int]:
        """Router targets: index in MODALITIES, or -1 for unknown."""
        return [MODALITIES.index(r.modality) if r.modality in MODALITIES else -1 for r in self.records]


class Collate:
    """Batch of examples -> padded tensors (processor.pad) + pixel_values stacked in the order
    images appear in the batch (None when no example has an image)."""

    def __init__(self, processor, padding_side: str = "right"):
        self.processor = processor
        self.padding_side = padding_side

    def __call__(self, batch: list[dict]) -> dict:
        out = self.processor.pad([Encoded(b["input_ids"], b["labels"]) for b in batch], padding_side=self.padding_side)
        pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
        out["pixel_values"] = torch.cat(pixels) if pixels else None
        out["ids"] = [b["id"] for b in batch]
        out["modality"] = [b.get("modality", "unknown") for b in batch]
        return out


def collate(batch: list[dict], processor) -> dict:
    return Collate(processor)(batch)


# ---- sampling ---------------------------------------------------------------------------------

def seeded_permutation(n: int, seed: int, epoch: int = 0) -> list[int]:
    """The same order for the same (seed, epoch) on every machine and run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class SeededSampler(Sampler[int]):
    """Shuffled indices, deterministic from seed and epoch (call set_epoch each epoch)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(seeded_permutation(self.n, self.seed, self.epoch) if self.shuffle else range(self.n))


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a seeded random order.

    Each epoch: a seeded permutation is cut into mega-batches of `batch_size * group`, each sorted
    by length (longest first), cut into batches; the batch order is then shuffled too."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: int = 50, drop_last: bool = False):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths, self.batch_size, self.seed, self.group, self.drop_last = list(lengths), batch_size, seed, group, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = seeded_permutation(len(self.lengths), self.seed, self.epoch)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        shuffle = seeded_permutation(len(batches), self.seed + 1, self.epoch)
        return iter([batches[i] for i in shuffle])


# ---- mixtures ---------------------------------------------------------------------------------

class MixtureDataset(Dataset):
    """Several datasets sampled in proportion to their weights.

    Each epoch holds `size` examples (default: the sum of the sizes); dataset i contributes
    round(size * w_i / sum(w)) of them: a seeded subset when that is fewer than it has, every
    example plus seeded repeats when more. Call set_epoch for a fresh draw."""

    def __init__(self, datasets: dict[str, Dataset] | Sequence[Dataset], weights: dict[str, float] | Sequence[float] | None = None,
                 size: int | None = None, seed: int = 0):
        if isinstance(datasets, dict):
            self.names = list(datasets)
            self.datasets = list(datasets.values())
            weights = [weights[n] for n in self.names] if isinstance(weights, dict) else weights
        else:
            self.datasets = list(datasets)
            self.names = [str(i) for i in range(len(self.datasets))]
        weights = list(weights) if weights is not None else [float(len(d)) for d in self.datasets]
        if len(weights) != len(self.datasets) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"mixture weights {weights}: need one non-negative weight per dataset, not all zero")
        if any(len(d) == 0 for d, w in zip(self.datasets, weights) if w > 0):
            raise DataError("a dataset with a positive weight is empty")
        self.weights = [w / sum(weights) for w in weights]
        self.size = size if size is not None else sum(len(d) for d in self.datasets)
        self.seed = seed
        self.set_epoch(0)

    def counts(self) -> list[int]:
        raw = [self.size * w for w in self.weights]
        counts = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: self.size - sum(counts)]:
            counts[i] += 1  # largest remainders get the leftover examples
        return counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.index: list[tuple[int, int]] = []
        for d, (dataset, count) in enumerate(zip(self.datasets, self.counts())):
            n = len(dataset)
            picks: list[int] = []
            round_ = 0
            while len(picks) < count:
                picks += seeded_permutation(n, self.seed + 7919 * d, epoch * 1000 + round_)
                round_ += 1
            self.index += [(d, i) for i in picks[:count]]
        # Interleave the datasets, so even an unshuffled loader sees the mixture.
        self.index = [self.index[i] for i in seeded_permutation(len(self.index), self.seed, epoch)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int):
        d, i = self.index[index]
        return self.datasets[d][i]

    def lengths(self) -> list[int]:
        per = [d.lengths() if hasattr(d, "lengths") else [1] * len(d) for d in self.datasets]
        return [per[d][i] for d, i in self.index]

    def source(self, index: int) -> str:
        return self.names[self.index[index][0]]
