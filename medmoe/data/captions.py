"""Phase-1 (alignment) captions built from what the datasets know.

The paper aligns the projector on LLaVA-Med's 500K PubMed image-caption pairs, which are not
available here. Instead each training image gets one short caption from what its dataset knows:
modality, organ or body region (VQA-RAD `image_organ`, SLAKE `location`, PathVQA's answers to
"where is this?"), the labelled structures of SLAKE's `detection.json`, PathVQA's answers to
"what does this image show?", and MedMNIST class names. These captions are far
fewer, shorter and more repetitive than the paper's; results must say so.

    {"id": "caption-slake-xmlab0", "image": "imgs/xmlab0/source.jpg", "question": "",
     "answer": "This is a CT scan of the abdomen showing liver, spleen and left kidney.", ...}

With the plain template a caption record trains `<image>{caption}\\n`, loss on the caption.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Sequence

from .records import UNKNOWN, Record

MODALITY_NAMES = {"CT": "CT scan", "MRI": "MRI scan", "X-Ray": "X-ray", "Pathology": "pathology image", UNKNOWN: "medical image"}
VOWEL_SOUND = re.compile(r"^(?:[aeiou]|mri?\b|x-ray)", re.I)  # "an MRI", "an X-ray", "a CT"
# Question forms whose answers describe the image (PathVQA) or where it is from.
SHOWS_QUESTIONS = re.compile(r"^what does this image show\??$", re.I)
WHERE_QUESTIONS = re.compile(r"^(where is this|where is this from|where does this belong to|where is this area in the body)\??$", re.I)
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
            phrase = name.strip().lower()
            if phrase not in out:
                out.append(phrase)
    return out


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def article(noun: str) -> str:
    return "an" if VOWEL_SOUND.match(noun) else "a"


def caption(record: Record, structures: Sequence[str] = (), rng: random.Random | None = None,
            findings: Sequence[str] = (), organ: str | None = None) -> str:
    """One sentence from the facts of an image (its first record's modality and meta)."""
    rng = rng or random.Random(0)
    what = MODALITY_NAMES.get(record.modality, "medical image")
    kind = record.meta.get("kind")
    if kind:  # MedMNIST: "chest X-ray", "abdominal CT slice (coronal)"
        what = kind
    shows = ""
    if structures:
        shows = " showing " + _join(list(structures))
    elif findings:
        shows = " showing " + _join(list(findings))
    elif record.meta.get("label_name"):  # MedMNIST class
        shows = f" classified as {record.meta['label_name']}"
    organ = organ if organ is not None else record.meta.get("organ", "")
    text = rng.choice(PATTERNS).format(what=what, What=what[0].upper() + what[1:], organ=organ_phrase(organ), shows=shows,
                                       n="n" if article(what) == "an" else "")
    return text[0].upper() + text[1:]


def qa_facts(records: Sequence[Record]) -> tuple[list[str], str | None]:
    """(findings, organ) stated by an image's QA: "what does this image show?" -> finding,
    "where is this?" -> organ or organ system. Used for PathVQA, whose images have no metadata."""
    findings, organ = [], None
    for r in records:
        if r.answer_type != "OPEN":
            continue
        if SHOWS_QUESTIONS.match(r.question.strip()) and r.answer not in findings and len(findings) < 2:
            findings.append(r.answer)
        elif organ is None and WHERE_QUESTIONS.match(r.question.strip()):
            organ = r.answer
    return findings, organ


def build_captions(records: Sequence[Record], image_root: Path | str | None = None, seed: int = 0) -> list[Record]:
    """One caption record per distinct image. image_root locates SLAKE's detection.json files
    next to the images. Pass training records only, so no test image is seen in alignment."""
    rng = random.Random(seed)
    by_image: dict[str, list[Record]] = {}
    for r in records:
        if r.image:
            by_image.setdefault(r.image, []).append(r)
    out = []
    for image, group in by_image.items():
        first = group[0]
        structures: list[str] = []
        if first.dataset == "slake" and image_root is not None:
            structures = detected_structures((Path(image_root) / image).parent / "detection.json")
        findings, organ = qa_facts(group) if first.dataset == "pathvqa" else ([], None)
        stem = Path(image).parent.name if first.dataset == "slake" else Path(image).stem
        text = caption(first, structures, rng, findings=findings, organ=organ)
        out.append(Record(id=f"caption-{first.dataset}-{stem}", image=image, question="", answer=text, answer_type="OPEN",
                          modality=first.modality, dataset=f"{first.dataset}-captions", split="captions", language="en",
                          meta={k: v for k, v in first.meta.items() if k in ("organ", "label_name", "kind")}))
    return out
