"""`medmoe data`: prepare datasets as shipped into canonical records, build captions, convert.

    medmoe data prepare vqa-rad --src PATH --out DIR [--json]
    medmoe data captions DIR [--split train]          # DIR/captions.jsonl for phase 1
    medmoe data label-questions DIR [--split test]    # DIR/label-questions-test.jsonl: yes/no from image labels
    medmoe data convert IN OUT                         # .jsonl <-> LLaVA .json
"""

from __future__ import annotations

import json

SOURCES = ("vqa-rad", "slake", "pathvqa", "medmnist", "llava")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare datasets, build captions, convert formats")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("prepare", help="dataset as shipped -> DIR/{split}.jsonl + DIR/dataset.json")
    p.add_argument("name", choices=SOURCES)
    p.add_argument("--src", required=True, help="the dataset as its authors ship it (folder or file)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lang", default="en", choices=("en", "zh", "all"), help="SLAKE question language (default en)")
    p.add_argument("--split", help="llava: split name (default: each sample's 'split' key, else the file name)")
    p.add_argument("--image-root", help="folder the image paths are relative to (llava default: the JSON's folder)")
    p.add_argument("--labels", help="medmnist: comma-separated label names for an unknown npz")
    p.add_argument("--check-images", action="store_true", help="open every image once (slow on large sets)")
    p.add_argument("--no-size-check", action="store_true", help="skip the published split-size checks")
    p.add_argument("--plot", action="store_true", help="also draw DIR/counts.png (QA per split, answer type, modality)")
    p.add_argument("--holdout", type=float, help="move this fraction of the train images (with their questions) "
                   "to a 'heldout' split, e.g. 0.1 for PathVQA, whose test split is not public here")
    p.add_argument("--seed", type=int, default=0, help="seed of --holdout")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run_prepare)

    c = sub.add_parser("captions", help="phase-1 caption records from a prepared folder's metadata")
    c.add_argument("dir", help="a folder written by `medmoe data prepare`")
    c.add_argument("--split", default="train", help="records to caption (default train: no test images)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_captions)

    q = sub.add_parser("label-questions", help="closed yes/no questions from each image's labels (modality, organ, "
                       "SLAKE structures): train on them, or evaluate whether a model reads the image")
    q.add_argument("dir", help="a folder written by `medmoe data prepare`")
    q.add_argument("--split", default="test", help="the split whose images are asked about (default test)")
    q.add_argument("--out", help="records file to write (default DIR/label-questions-SPLIT.jsonl)")
    q.add_argument("--seed", type=int, default=0, help="seed of the classes the 'no' questions name")
    q.set_defaults(func=run_label_questions)

    v = sub.add_parser("convert", help="canonical .jsonl <-> LLaVA conversation .json (by extension)")
    v.add_argument("input")
    v.add_argument("output")
    v.set_defaults(func=run_convert)


def run_prepare(args) -> int:
    from pathlib import Path

    from ..data.prepare import plot_summary, prepare

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    info = prepare(args.name, args.src, args.out, lang=args.lang, split=args.split, labels=labels,
                   check_sizes=not args.no_size_check, verify_images=args.check_images, progress=not args.json,
                   images=args.image_root, holdout=args.holdout, seed=args.seed)
    if args.plot:
        plot_summary(info, Path(args.out) / "counts.png")
    if args.json:
        print(json.dumps({k: info[k] for k in ("name", "image_root", "language", "splits", "checks")}))
        return 0
    print(f"{args.name} -> {args.out}  (images under {info['image_root']})")
    for split, s in info["splits"].items():
        types = ", ".join(f"{k} {v}" for k, v in s["answer_type"].items())
        modalities = ", ".join(f"{k} {v}" for k, v in s["modality"].items())
        cov = s["modality_coverage"]
        print(f"  {split:<10} {s['total']:>6} QA, {s['images']:>5} images | {types} | {modalities} "
              f"| modality known for {cov['qa']:.1%} of QA, {cov['images']:.1%} of images")
    for check in info["checks"]:
        print(f"  check: {check}")
    return 0


def run_captions(args) -> int:
    from pathlib import Path

    from ..data.captions import build_captions
    from ..data.records import image_root, load_split, read_records, write_records

    directory = Path(args.dir)
    load_split(directory, args.split)  # clear error when the split is missing
    records = read_records(directory / f"{args.split}.jsonl")
    captions = build_captions(records, image_root(directory), seed=args.seed)
    write_records(directory / "captions.jsonl", captions)
    print(f"{len(captions)} captions -> {directory / 'captions.jsonl'}")
    for c in captions[:3]:
        print(f"  {c.image}: {c.answer}")
    return 0


def run_label_questions(args) -> int:
    from collections import Counter
    from pathlib import Path

    from ..data.label_questions import label_questions
    from ..data.records import load_split, write_records

    directory = Path(args.dir)
    questions = label_questions(load_split(directory, args.split), seed=args.seed)
    out = Path(args.out) if args.out else directory / f"label-questions-{args.split}.jsonl"
    write_records(out, questions)
    families = ", ".join(f"{k} {v}" for k, v in Counter(q.meta["question_type"] for q in questions).items())
    print(f"{len(questions)} questions ({families}; half of them answered yes) -> {out}")
    print(f"  medmoe eval --data {out} --split {args.split} --max-new-tokens 8")
    return 0


def run_convert(args) -> int:
    from ..data.records import read_records, write_llava, write_records

    records = read_records(args.input)
    n = write_llava(args.output, records) if args.output.endswith(".json") else write_records(args.output, records)
    print(f"{n} records -> {args.output}")
    return 0
