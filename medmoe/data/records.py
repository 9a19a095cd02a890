"""The canonical record: one question-answer pair about (at most) one image, one JSONL line each.

    {"id": "vqa-rad-0", "image": "VQA_RAD Image Folder/synpic54610.jpg", "question": "...",
     "answer": "Yes", "answer_type": "CLOSED", "modality": "MRI", "dataset": "vqa-rad",
     "split": "train", "language": "en"}

Optional keys: `choices` (classification label names), `turns` (further [question, answer]
pairs of a multi-turn conversation) and `meta` (dataset-specific facts such as the organ).

Image paths are stored relative to an image root, so a prepared folder does not depend on
where the raw data lived: `DIR/dataset.json` names the root (`image_root`, absolute, or relative
to DIR); without a dataset.json the root is the folder holding the JSONL file.

The LLaVA conversation format used by the Med-MoE and LLaVA-Med code is read and written too:
    {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                      {"from": "gpt", "value": "..."}]}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import IMAGE_TOKEN, MODALITIES
from ..errors import DataError
from ..files import atomic_write_text, iter_jsonl

ANSWER_TYPES = ("OPEN", "CLOSED")
UNKNOWN = "unknown"
DATASET_FILE = "dataset.json"
YES_NO = ("yes", "no")


@dataclass
class Record:
    id: str
    image: str | None
    question: str
    answer: str
    answer_type: str = "OPEN"
    modality: str = UNKNOWN
    dataset: str = ""
    split: str = "train"
    language: str = "en"
    choices: list[str] | None = None
    turns: list[list[str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.id = str(self.id)
        self.question = str(self.question)
        self.answer = str(self.answer)
        self.answer_type = normalise_answer_type(self.answer_type, self.answer)
        self.modality = normalise_modality(self.modality)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("choices", "turns", "meta"):
            if not out[key]:
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "Record":
        missing = [k for k in ("id", "question", "answer") if k not in d]
        if missing:
            raise DataError(f"{where}: record lacks {', '.join(missing)}; each line needs id, image, question, answer")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("image", None)
        return cls(**known)


def normalise_modality(value) -> str:
    """"x-ray", "XRAY", "ct" -> the router's spelling; anything else -> unknown."""
    key = str(value or "").strip().lower().replace("-", "").replace(" ", "")
    return _MODALITY_KEYS.get(key, UNKNOWN)


_MODALITY_KEYS = {m.lower().replace("-", ""): m for m in MODALITIES}


def normalise_answer_type(value, answer: str = "") -> str:
    """`"CLOSED "` -> `CLOSED`; anything missing is inferred: yes/no answers are CLOSED."""
    text = str(value or "").strip().upper()
    if text in ANSWER_TYPES:
        return text
    return "CLOSED" if str(answer).strip().lower() in YES_NO else "OPEN"


# ---- JSONL ------------------------------------------------------------------------------------

def write_records(path, records: Iterable[Record]) -> int:
    """Write records as JSONL atomically (temp file + rename). Returns the number written."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_records(path, resolve_images: bool = False) -> list[Record]:
    """Read canonical JSONL, or a LLaVA-format JSON list (detected by its `conversations`).

    With resolve_images, image paths become absolute (see `image_root`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".json":
        records = read_llava(path)
    else:
        records = [Record.from_dict(d, f"{path}:{n}") for n, d in iter_jsonl(path)]
    if resolve_images:
        root = image_root(path.parent)
        for r in records:
            if r.image and not os.path.isabs(r.image):
                r.image = str(root / r.image)
    return records


def image_root(directory) -> Path:
    """Where a prepared folder's relative image paths point: dataset.json's `image_root`
    (absolute, or relative to the folder), else the folder itself."""
    directory = Path(directory)
    info = read_dataset_info(directory)
    root = Path(info.get("image_root", "."))
    return (root if root.is_absolute() else directory / root).resolve()


def read_dataset_info(directory) -> dict:
    path = Path(directory) / DATASET_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg})") from None


def load_split(directory, split: str) -> list[Record]:
    """Records of `DIR/{split}.jsonl` with absolute image paths."""
    path = Path(directory) / f"{split}.jsonl"
    if not path.exists():
        have = sorted(p.stem for p in Path(directory).glob("*.jsonl"))
        raise DataError(f"{path}: no such split; {directory} has {have or 'no .jsonl files'}")
    return read_records(path, resolve_images=True)


# ---- LLaVA conversation format ----------------------------------------------------------------

def to_llava(record: Record) -> dict:
    question = record.question
    if record.image and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": record.answer}]
    for q, a in record.turns:
        conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    out = {"id": record.id}
    if record.image:
        out["image"] = record.image
    out["conversations"] = conversations
    # Extra keys are ignored by LLaVA's loader and keep the round trip lossless.
    out.update(answer_type=record.answer_type, modality=record.modality, dataset=record.dataset,
               split=record.split, language=record.language)
    if record.choices:
        out["choices"] = record.choices
    if record.meta:
        out["meta"] = record.meta
    return out


def strip_image_token(text: str) -> str:
    return text.replace(f"{IMAGE_TOKEN}\n", "").replace(f"\n{IMAGE_TOKEN}", "").replace(IMAGE_TOKEN, "").strip()


def from_llava(d: dict, where: str = "", split: str = "train", dataset: str = "llava") -> Record:
    conv = d.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{where}: needs a 'conversations' list of human/gpt turns")
    pairs = []
    for i in range(0, len(conv) - 1, 2):
        human, gpt = conv[i], conv[i + 1]
        if human.get("from") not in ("human", "user") or gpt.get("from") not in ("gpt", "assistant"):
            raise DataError(f"{where}: turn {i} should be human then gpt, got {human.get('from')!r}, {gpt.get('from')!r}")
        pairs.append([strip_image_token(str(human["value"])), str(gpt["value"])])
    image = d.get("image")
    if isinstance(image, list):  # multi-image samples: first image only
        image = image[0] if image else None
    return Record(id=str(d.get("id", where)), image=image, question=pairs[0][0], answer=pairs[0][1],
                  answer_type=d.get("answer_type", ""), modality=d.get("modality", UNKNOWN),
                  dataset=d.get("dataset", dataset), split=d.get("split", split), language=d.get("language", "en"),
                  choices=d.get("choices"), turns=pairs[1:], meta=d.get("meta") or {})


def read_llava(path, split: str | None = None) -> list[Record]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA samples")
    split = split or path.stem
    return [from_llava(d, f"{path}[{i}]", split=split) for i, d in enumerate(data)]


def write_llava(path, records: Iterable[Record]) -> int:
    data = [to_llava(r) for r in records]
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1))
    return len(data)


# ---- helpers ----------------------------------------------------------------------------------

def sample_dataset_dir() -> Path:
    """The bundled demo data: 12 CC0 VQA-RAD images with train.jsonl and test.jsonl."""
    return Path(__file__).resolve().parents[1] / "assets" / "sample"
