"""Datasets as their authors ship them -> canonical records (see records.py).

One function per source, each returning {split: [Record, ...]} without opening any image
(image checks are optional: `check_images`). `prepare(name, src, out)` writes
`out/{split}.jsonl` plus `out/dataset.json` (the image root, counts and modality coverage).

Image paths in records stay as the dataset names them, relative to `--src`; dataset.json's
`image_root` is the absolute --src path. Move the raw data and only that one line changes.
MedMNIST arrives as arrays, so its images are written as PNGs under `out/images/` and the
image root is the output folder itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..config import MODALITIES
from ..errors import DataError
from ..files import atomic_write_text, iter_jsonl
from .records import DATASET_FILE, UNKNOWN, Record, read_llava, write_records

SOURCES = ("vqa-rad", "slake", "pathvqa", "medmnist", "llava")

# Sizes every paper reports; a mismatch means a wrong file or a wrong split rule.
KNOWN_SIZES = {
    ("vqa-rad", "test"): {"total": 451, "CLOSED": 272, "OPEN": 179},
    ("slake", "test", "en"): {"total": 1061, "CLOSED": 416, "OPEN": 645},
}


# ---- VQA-RAD ----------------------------------------------------------------------------------

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}

# Words that state a modality (lower-cased text). Anything else (ultrasound, PET) is not a label.
MODALITY_WORDS = {
    "CT": r"\bct\b|computed tomography|\bcat scan",
    "MRI": r"\bmri?\b|magnetic resonance|\bt[12]\b|\bt[12][- ]weighted|\bflair\b|diffusion|\bdwi\b",
    "X-Ray": r"x-? ?ray|\bcxr\b|radiograph|\bfilm\b|mammogra",
}


def modalities_named(text: str) -> set[str]:
    text = text.lower()
    return {m for m, pattern in MODALITY_WORDS.items() if re.search(pattern, text)}


def vqa_rad_modality_votes(question: str, answer: str) -> set[str]:
    """Modalities that one MODALITY question and its answer state about their image.

    Open answers name it ("CT with contrast", "T2-MRI"); a "yes" to "Is this a CT?" names it;
    a "no" says only what it is not, and questions with "not" are skipped."""
    q, a = question.lower(), str(answer).lower().strip()
    if re.search(r"\bnot\b", q):
        return set()
    if a in ("yes", "no"):
        named = modalities_named(q)
        return named if a == "yes" and len(named) == 1 else set()
    named = modalities_named(a)
    return named if len(named) == 1 else set()


def derive_vqa_rad_modalities(rows: list[dict]) -> dict[str, str]:
    """image_name -> modality, for images whose MODALITY questions agree on one."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        if "MODALITY" in str(row.get("question_type", "")).upper():
            for m in vqa_rad_modality_votes(row["question"], row["answer"]):
                votes[row["image_name"]][m] += 1
    out = {}
    for image, counter in votes.items():
        (best, n), *rest = counter.most_common() + [(None, 0)]
        if rest[0][1] < n:  # a clear majority; ties stay unknown
            out[image] = best
    return out


def prepare_vqa_rad(src) -> dict[str, list[Record]]:
    """VQA-RAD from its OSF release. train = freeform + para, test = test_freeform + test_para."""
    src = Path(src)
    path = src if src.is_file() else src / VQA_RAD_JSON
    rows = _load_json(path)
    # Test answers must not reach training: the test questions ask about training images, so the
    # training records' modality is voted by training questions alone; the test records' (used
    # only to break scores down by modality) by all questions.
    modality = {"train": derive_vqa_rad_modalities([r for r in rows if VQA_RAD_SPLITS.get(r.get("phrase_type")) == "train"]),
                "test": derive_vqa_rad_modalities(rows)}
    image_dir = VQA_RAD_IMAGES
    splits: dict[str, list[Record]] = defaultdict(list)
    for row in rows:
        split = VQA_RAD_SPLITS.get(row.get("phrase_type"))
        if split is None:
            raise DataError(f"{path}: qid {row.get('qid')} has phrase_type {row.get('phrase_type')!r}; expected one of {list(VQA_RAD_SPLITS)}")
        splits[split].append(Record(
            id=f"vqa-rad-{row['qid']}", image=f"{image_dir}/{row['image_name']}", question=row["question"].strip(),
            answer=str(row["answer"]).strip(), answer_type=row["answer_type"], modality=modality[split].get(row["image_name"], UNKNOWN),
            dataset="vqa-rad", split=split, language="en",
            meta={"organ": row.get("image_organ", "").strip(), "question_type": row.get("question_type", "").strip()}))
    return dict(splits)


# ---- SLAKE ------------------------------------------------------------------------------------

SLAKE_SPLITS = {"train": "train.json", "validation": "validate.json", "test": "test.json"}


def prepare_slake(src, lang: str = "en") -> dict[str, list[Record]]:
    """SLAKE from its official split files; lang 'en', 'zh' or 'all'."""
    if lang not in ("en", "zh", "all"):
        raise DataError(f"SLAKE language {lang!r}: use en, zh or all")
    src = Path(src)
    splits = {}
    for split, name in SLAKE_SPLITS.items():
        path = src / name
        if not path.exists():
            continue
        splits[split] = [
            Record(id=f"slake-{row['qid']}", image=f"imgs/{row['img_name']}", question=row["question"].strip(),
                   answer=str(row["answer"]).strip(), answer_type=row["answer_type"], modality=row.get("modality", UNKNOWN),
                   dataset="slake", split=split, language=row["q_lang"],
                   meta={"organ": row.get("location", ""), "content_type": row.get("content_type", ""),
                         "base_type": row.get("base_type", ""), "img_id": row.get("img_id")})
            for row in _load_json(path) if lang == "all" or row["q_lang"] == lang]
    if not splits:
        raise DataError(f"{src}: no SLAKE split files ({', '.join(SLAKE_SPLITS.values())}); pass the folder holding them")
    return splits


# ---- PathVQA ----------------------------------------------------------------------------------

def prepare_pathvqa(src) -> dict[str, list[Record]]:
    """PathVQA's {"image", "question", "answer"} JSONL export: one `{split}.jsonl` per split.
    CLOSED = yes/no answers; every image is pathology."""
    src = Path(src)
    files = [src] if src.is_file() else sorted(src.glob("*.jsonl"))
    if not files:
        raise DataError(f"{src}: no .jsonl files; expected train.jsonl (and test.jsonl, val.jsonl) with image, question, answer")
    splits = {}
    for path in files:
        split = {"val": "validation", "valid": "validation"}.get(path.stem, path.stem)
        records = []
        for n, row in iter_jsonl(path):
            try:
                image, question, answer = row["image"], row["question"], row["answer"]
            except (KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: expected an object with image, question, answer ({err})") from None
            answer = str(answer).strip()
            records.append(Record(id=f"pathvqa-{split}-{n - 1}", image=image, question=question.strip(), answer=answer,
                                  answer_type="CLOSED" if answer.lower() in ("yes", "no") else "OPEN",
                                  modality="Pathology", dataset="pathvqa", split=split, language="en"))
        splits[split] = records
    return splits


# ---- MedMNIST ---------------------------------------------------------------------------------

# Label names and modality of the 2D MedMNIST v2 datasets (from medmnist's INFO table).
ORGAN_LABELS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                "lung-left", "lung-right", "pancreas", "spleen"]
MEDMNIST = {
    "pneumoniamnist": ("X-Ray", "chest X-ray", ["normal", "pneumonia"]),
    "chestmnist": ("X-Ray", "chest X-ray", ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                            "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                                            "pleural thickening", "hernia"]),
    "organamnist": ("CT", "abdominal CT slice (axial)", ORGAN_LABELS),
    "organcmnist": ("CT", "abdominal CT slice (coronal)", ORGAN_LABELS),
    "organsmnist": ("CT", "abdominal CT slice (sagittal)", ORGAN_LABELS),
    "pathmnist": ("Pathology", "colon pathology image", ["adipose", "background", "debris", "lymphocytes", "mucus",
                                                          "smooth muscle", "normal colon mucosa", "cancer-associated stroma",
                                                          "colorectal adenocarcinoma epithelium"]),
    "bloodmnist": ("Pathology", "blood cell microscopy image", ["basophil", "eosinophil", "erythroblast", "immature granulocytes",
                                                                 "lymphocyte", "monocyte", "neutrophil", "platelet"]),
    "tissuemnist": ("Pathology", "kidney cortex microscopy image", ["collecting duct, connecting tubule", "distal convoluted tubule",
                                                                     "glomerular endothelial cells", "interstitial endothelial cells",
                                                                     "leukocytes", "podocytes", "proximal tubule segments",
                                                                     "thick ascending limb"]),
    "dermamnist": (UNKNOWN, "dermatoscopy image", ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                                   "melanocytic nevi", "vascular lesions"]),
    "octmnist": (UNKNOWN, "retinal OCT image", ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "breastmnist": (UNKNOWN, "breast ultrasound image", ["malignant", "normal or benign"]),
    "retinamnist": (UNKNOWN, "retinal fundus image", ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"]),
}
MEDMNIST_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def medmnist_question(kind: str, labels: list[str], multi_label: bool) -> str:
    options = ", ".join(labels)
    if multi_label:
        return f"Which findings does this {kind} show? Answer with the findings from: {options}; or none."
    return f"Which class does this {kind} belong to? Options: {options}."


def prepare_medmnist(npz, out_dir=None, labels: list[str] | None = None, progress: bool = False) -> dict[str, list[Record]]:
    """A MedMNIST v2 2D npz file -> classification records whose question offers the label names.

    Images are written as PNGs under out_dir/images/{split}/ when out_dir is given (the image
    path in each record is relative to out_dir)."""
    from PIL import Image
    from tqdm import tqdm

    npz = Path(npz)
    if npz.is_dir():
        found = sorted(npz.glob("*.npz"))
        if len(found) != 1:
            raise DataError(f"{npz}: expected one .npz file, found {len(found)}; pass the file itself")
        npz = found[0]
    name = npz.stem.lower().removesuffix("_224").removesuffix("_128").removesuffix("_64")
    if name not in MEDMNIST and labels is None:
        raise DataError(f"{npz}: unknown MedMNIST dataset {name!r} (known: {', '.join(MEDMNIST)}); pass --labels")
    modality, kind, default_labels = MEDMNIST.get(name, (UNKNOWN, "medical image", None))
    labels = list(labels or default_labels)
    try:
        arrays = np.load(npz)
    except (OSError, ValueError) as err:
        raise DataError(f"{npz}: not a readable .npz file ({err})") from None
    multi_label = name == "chestmnist"
    question = medmnist_question(kind, labels, multi_label)
    splits = {}
    for key, split in MEDMNIST_SPLITS.items():
        if f"{key}_images" not in arrays.files:
            continue
        images, targets = arrays[f"{key}_images"], arrays[f"{key}_labels"]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise DataError(f"{npz}: {key}_images has shape {images.shape}; only 2D MedMNIST (N,H,W[,C]) is supported")
        records = []
        for i in tqdm(range(len(images)), desc=f"{name} {split}", disable=not (progress and out_dir is not None)):
            target = np.asarray(targets[i]).reshape(-1)
            if multi_label:
                found = [labels[j] for j in np.flatnonzero(target)]
                answer = ", ".join(found) if found else "none"
            else:
                if not 0 <= int(target[0]) < len(labels):
                    raise DataError(f"{npz}: {key}_labels[{i}] = {int(target[0])} but only {len(labels)} label names")
                answer = labels[int(target[0])]
            image = f"images/{split}/{i:06d}.png"
            if out_dir is not None:
                path = Path(out_dir) / image
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i].squeeze() if images.ndim == 4 and images.shape[-1] == 1 else images[i]).save(path)
            records.append(Record(id=f"{name}-{split}-{i}", image=image, question=question, answer=answer,
                                  answer_type="CLOSED", modality=modality, dataset=name, split=split, language="en",
                                  choices=None if multi_label else labels, meta={"label_name": answer, "kind": kind}))
        splits[split] = records
    if not splits:
        raise DataError(f"{npz}: no train_images/val_images/test_images arrays; is this a MedMNIST file?")
    return splits


# ---- LLaVA ------------------------------------------------------------------------------------

def prepare_llava(json_path, split: str | None = None) -> dict[str, list[Record]]:
    """A LLaVA conversation JSON, as is. Split: `split` when given, else each sample's own
    "split" key, else the file name."""
    records = read_llava(json_path, split=split)
    splits: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        r.split = split or r.split
        splits[r.split].append(r)
    return dict(splits)


# ---- writing and summaries --------------------------------------------------------------------

def summarise(splits: dict[str, list[Record]]) -> dict:
    out = {}
    for split, records in splits.items():
        images = {r.image for r in records if r.image}
        known_images = {r.image for r in records if r.image and r.modality != UNKNOWN}
        out[split] = {
            "total": len(records),
            "answer_type": dict(sorted(Counter(r.answer_type for r in records).items())),
            "modality": dict(sorted(Counter(r.modality for r in records).items())),
            "images": len(images),
            "modality_coverage": {"qa": _fraction(sum(r.modality != UNKNOWN for r in records), len(records)),
                                  "images": _fraction(len(known_images), len(images))},
        }
    return out


def _fraction(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def check_known_sizes(name: str, summary: dict, lang: str = "en") -> list[str]:
    """Compare with the published split sizes; returns the checks made, raises on mismatch."""
    done = []
    for key, expected in KNOWN_SIZES.items():
        if key[0] != name or (len(key) == 3 and key[2] != lang) or key[1] not in summary:
            continue
        s = summary[key[1]]
        got = {"total": s["total"], **{t: s["answer_type"].get(t, 0) for t in ("CLOSED", "OPEN")}}
        if got != expected:
            raise DataError(f"{name} {key[1]}: {got} but the published split has {expected}; wrong file or version?")
        done.append(f"{name} {key[1]}: {expected['total']} = {expected['CLOSED']} closed + {expected['OPEN']} open (ok)")
    return done


def check_images(splits: dict[str, list[Record]], root: Path, progress: bool = True) -> None:
    """Open every distinct image once (optional: slow on big sets). Raises naming the first bad one."""
    from tqdm import tqdm

    from .images import load_image

    images = sorted({r.image for records in splits.values() for r in records if r.image})
    for image in tqdm(images, desc="checking images", disable=not progress):
        load_image(root / image)


def hold_out(splits: dict[str, list[Record]], fraction: float, seed: int = 0, source: str = "train",
             name: str = "heldout") -> dict[str, list[Record]]:
    """Move a seeded `fraction` of the `source` split's images (with all their questions) to `name`.

    Split by image, never by question, so no held-out image is seen in training. Stable: an image's
    side depends only on its path and the seed, not on the order or size of the file."""
    if not 0 < fraction < 1:
        raise DataError(f"--holdout {fraction}: use a fraction between 0 and 1, e.g. 0.1")
    if source not in splits:
        raise DataError(f"no '{source}' split to hold out from; splits are {sorted(splits)}")
    import hashlib

    def held(image: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{image}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    kept, moved = [], []
    for record in splits[source]:
        (moved if held(record.image) else kept).append(record)
    for record in moved:
        record.split = name
    return {**splits, source: kept, name: moved}


def prepare(name: str, src, out, lang: str = "en", split: str | None = None, labels: list[str] | None = None,
            check_sizes: bool = True, verify_images: bool = False, progress: bool = True, images=None,
            holdout: float | None = None, seed: int = 0) -> dict:
    """Prepare one source into `out`: {split}.jsonl + dataset.json. Returns the summary.

    holdout: move that fraction of the training images (and their questions) into a `heldout`
    split, for datasets without a public test split here (PathVQA).

    images: the folder the image paths are relative to, when not the default (LLaVA's
    --image_folder; default: the JSON file's folder)."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.exists():
        raise DataError(f"{src}: not found; pass --src the folder (or file) the dataset was shipped as")
    out.mkdir(parents=True, exist_ok=True)
    if name == "vqa-rad":
        splits, root = prepare_vqa_rad(src), src if src.is_dir() else src.parent
    elif name == "slake":
        splits, root = prepare_slake(src, lang), src
    elif name == "pathvqa":
        splits, root = prepare_pathvqa(src), src if src.is_dir() else src.parent
    elif name == "medmnist":
        splits, root = prepare_medmnist(src, out_dir=out, labels=labels, progress=progress), out
    elif name == "llava":
        splits, root = prepare_llava(src, split), src.parent
    else:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(SOURCES)}")
    if images is not None:
        root = Path(images).expanduser().resolve()
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found")
    if holdout:
        splits = hold_out(splits, holdout, seed)
    if verify_images:
        check_images(splits, root, progress)
    summary = summarise(splits)
    checks = check_known_sizes(name, summary, lang) if check_sizes else []
    for split_name, records in splits.items():
        write_records(out / f"{split_name}.jsonl", records)
    info = {"name": name, "source": str(src), "image_root": "." if root == out else str(root),
            "language": lang if name == "slake" else "en", "modalities": list(MODALITIES),
            "splits": summary, "checks": checks, "holdout": {"fraction": holdout, "seed": seed} if holdout else None}
    atomic_write_text(out / DATASET_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def _load_json(path: Path):
    if not path.exists():
        raise DataError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def plot_summary(info: dict, path) -> None:
    """Bar charts of QA per split by answer type and by modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = info["splits"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, kinds in ((axes[0], "answer_type", ("CLOSED", "OPEN")), (axes[1], "modality", (*MODALITIES, UNKNOWN))):
        bottom = [0] * len(splits)
        for kind in kinds:
            values = [s[key].get(kind, 0) for s in splits.values()]
            if any(values):
                ax.bar(list(splits), values, bottom=bottom, label=kind, color="0.75" if kind == UNKNOWN else None)
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"{info['name']}: QA by {key.replace('_', ' ')}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
