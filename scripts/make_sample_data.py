"""Build medmoe/assets/sample/ (the README demo data) from the VQA-RAD OSF release (CC0).

    PYTHONPATH=. python scripts/make_sample_data.py --src ../shared/data/vqa-rad

Picks 4 CT, 4 MRI and 4 X-ray images whose modality the dataset states, keeps a few of each
image's train and test QA, and downscales the images to at most 256 px per side.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from PIL import Image

from medmoe.data.images import load_image
from medmoe.data.prepare import prepare_vqa_rad
from medmoe.data.records import Record, sample_dataset_dir, write_records

PER_MODALITY = 4
TRAIN_PER_IMAGE = 4
TEST_PER_IMAGE = 2
MAX_SIDE = 256


def pick(records: list[Record], n: int) -> list[Record]:
    """Up to n records, closed and open alternating so both kinds appear."""
    closed = [r for r in records if r.answer_type == "CLOSED"]
    open_ = [r for r in records if r.answer_type == "OPEN"]
    out = []
    while len(out) < n and (closed or open_):
        for group in (open_, closed):
            if group and len(out) < n:
                out.append(group.pop(0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", required=True)
    args = parser.parse_args()
    splits = prepare_vqa_rad(args.src)
    by_image = defaultdict(lambda: {"train": [], "test": []})
    for split, records in splits.items():
        for r in records:
            by_image[r.image][split].append(r)
    chosen = []
    for modality in ("CT", "MRI", "X-Ray"):
        candidates = sorted(image for image, s in by_image.items()
                            if s["test"] and len(s["train"]) >= TRAIN_PER_IMAGE and s["train"][0].modality == modality)
        chosen += candidates[:PER_MODALITY]
    out = sample_dataset_dir()
    (out / "images").mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for image in chosen:
        name = Path(image).name
        picture = load_image(Path(args.src) / image)
        picture.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
        picture.save(out / "images" / name, quality=85, optimize=True)
        for split, n, target in (("train", TRAIN_PER_IMAGE, train), ("test", TEST_PER_IMAGE, test)):
            for r in pick(by_image[image][split], n):
                r.image = f"images/{name}"
                target.append(r)
    write_records(out / "train.jsonl", train)
    write_records(out / "test.jsonl", test)
    size = sum(p.stat().st_size for p in (out / "images").iterdir())
    print(f"{len(chosen)} images ({size / 1024:.0f} KB), {len(train)} train QA, {len(test)} test QA -> {out}")


if __name__ == "__main__":
    main()
