"""Phase-1 (alignment) captions built from what the datasets know.

The paper aligns the projector on LLaVA-Med's 500K PubMed image-caption pairs, which are not
available here. Instead each training image gets one short caption from its metadata: modality,
organ or body region (VQA-RAD `image_organ`, SLAKE `location`), the labelled structures of SLAKE's
`detection.json`, and MedMNIST class names. These captions are far
fewer, shorter and more repetitive than the paper's; results must say so.

    {"id": "caption-slake-xmlab0", "image": "imgs/xmlab0/source.jpg", "question": "",
     "answer": "CT scan of the abdomen showing the liver (left), the spleen (right) ...", ...}

With the plain template a caption record trains `<image>{caption}\\n`, loss on the caption.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from .records import UNKNOWN, Record

MODALITY_NAMES = {"CT": "CT scan", "MRI": "MRI scan", "X-Ray": "X-ray", "Pathology": "pathology image", UNKNOWN: "medical image"}
ORGAN_NAMES = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen", "Brain_Tissue": "brain", "Brain_Face": "head and face",
               "Chest_lung": "chest", "Chest_mediastinal": "mediastinum", "Pelvic Cavity": "pelvic cavity"}
PATTERNS = (
    "{what}{organ}{shows}.",
    "This is a{n} {what}{organ}{shows}.",
    "{What}{organ}{shows}.",
)


def organ_phrase(organ: str) -> str:
    organ = ORGAN_NAMES.get(organ, organ.replace("_", " ").strip().lower())
    return f" of the {organ}" if organ else ""


def detected_structures(detection_json: Path) -> list[str]:
    """Structure names from SLAKE's detection.json ([{name: [x, y, w, h]}, ...]). Positions are
    left out: some boxes are in the coordinates of the original, larger images."""
    try:
        boxes = json.loads(detection_json.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    out = []
    for entry in boxes:
        for name in entry:
            phrase = f"the {name.strip().lower()}"
            if phrase not in out:
                out.append(phrase)
    return out


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(record: Record, structures: Sequence[str] = (), rng: random.Random | None = None) -> str:
    rng = rng or random.Random(0)
    what = MODALITY_NAMES.get(record.modality, "medical image")
    kind = record.meta.get("kind")
    if record.modality == UNKNOWN and kind:
        what = kind
    shows = ""
    if structures:
        shows = " showing " + _join(list(structures))
    elif record.meta.get("label_name"):  # MedMNIST class
        shows = f" classified as {record.meta['label_name']}"
    text = rng.choice(PATTERNS).format(what=what, What=what[0].upper() + what[1:], organ=organ_phrase(record.meta.get("organ", "")),
                                       shows=shows, n="n" if what[0] in "aeiouAEIOU" else "")
    return text[0].upper() + text[1:]


def build_captions(records: Sequence[Record], image_root: Path | str | None = None, seed: int = 0) -> list[Record]:
    """One caption record per distinct image (first record of each image supplies the facts).
    image_root locates SLAKE's detection.json files next to the images."""
    rng = random.Random(seed)
    seen: dict[str, Record] = {}
    for r in records:
        if r.image and r.image not in seen:
            seen[r.image] = r
    out = []
    for image, r in seen.items():
        structures: list[str] = []
        if r.dataset == "slake" and image_root is not None:
            structures = detected_structures((Path(image_root) / image).parent / "detection.json")
        stem = Path(image).parent.name if r.dataset == "slake" else Path(image).stem
        out.append(Record(id=f"caption-{r.dataset}-{stem}", image=image, question="", answer=caption(r, structures, rng),
                          answer_type="OPEN", modality=r.modality, dataset=f"{r.dataset}-captions", split="captions",
                          language="en", meta={k: v for k, v in r.meta.items() if k in ("organ", "label_name", "kind")}))
    return out

