"""Does contrastive alignment with MiniLM find anything in the nano's images? A CPU probe.

The nano's EfficientNet-Lite0 stays frozen; each training image's pooled feature (the mean of its
7 x 7 map, 1280 wide) goes through a linear head trained with medmoe's contrastive loss
(training/contrastive.py: symmetric InfoNCE, same-caption pairs masked) against the frozen MiniLM
vector of its metadata caption (data/captions.py). Images are split by image into train and
held-out; on the held-out images it reports image -> caption retrieval (recall@1/@5 over the
distinct held-out captions) and zero-shot modality and organ classification (the nearest of a
few prompts), with 95% bootstrap intervals and chance beside them. Controls: the untrained head,
and a head trained on captions shuffled across the training images.

    python scripts/lab/contrastive_probe.py --data data --pathvqa-images 700 --epochs 10,60 --out probe.json

DATA holds prepared folders (`medmoe data prepare ...`): vqa-rad, slake, pathvqa (train splits).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medmoe.data.captions import MODALITY_NAMES, article
from medmoe.data.images import load_image, preprocess
from medmoe.data.records import load_split
from medmoe.evaluation.intervals import balanced_accuracy, bootstrap_ci, bootstrap_ci_paired
from medmoe.model.presets import preset
from medmoe.training.contrastive import clip_loss, duplicate_mask, image_captions
from medmoe.vision import build_vision_tower
from medmoe.vision.text_encoder import load_minilm

MODALITIES = ("CT", "MRI", "X-Ray", "Pathology")
ORGANS = {"head": ("HEAD", "Brain", "Brain_Tissue", "Brain_Face"),
          "chest": ("CHEST", "Lung", "Chest_lung", "Chest_heart", "Chest_mediastinal"),
          "abdomen": ("ABD", "Abdomen"), "pelvic cavity": ("Pelvic Cavity",), "neck": ("Neck",)}
ORGAN_OF = {raw: organ for organ, raws in ORGANS.items() for raw in raws}


def image_facts(data: Path, pathvqa_images: int, seed: int) -> tuple[list, dict[str, dict]]:
    """Train records (PathVQA cut to a seeded subset of its images) and each image's labels."""
    records = []
    for name in ("vqa-rad", "slake", "pathvqa"):
        part = load_split(data / name, "train")
        if name == "pathvqa":
            images = sorted({r.image for r in part})
            keep = set(random.Random(seed).sample(images, min(pathvqa_images, len(images))))
            part = [r for r in part if r.image in keep]
        records += part
    facts = {}
    for r in records:
        facts.setdefault(r.image, {"modality": r.modality if r.modality in MODALITIES else None,
                                   "organ": ORGAN_OF.get(r.meta.get("organ", "")), "dataset": r.dataset})
    return records, facts


@torch.no_grad()
def pooled_features(images: list[str], batch: int = 32) -> torch.Tensor:
    vision = preset("nano").vision_config
    tower = build_vision_tower(vision, load_weights=True).eval()
    out = []
    for start in range(0, len(images), batch):
        pixels = torch.stack([preprocess(load_image(p), vision.image_size, vision.image_mean, vision.image_std)
                              for p in images[start:start + batch]])
        out.append(tower(pixels).mean(1))
    return torch.cat(out)


def train_head(features, caption_ids, caption_emb, epochs: int, batch: int, lr: float, temperature: float, seed: int):
    torch.manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], caption_emb.shape[1], bias=False)
    mean, std = features.mean(0), features.std(0) + 1e-6
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.arange(len(features))
    last = []
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=g)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            emb = F.normalize(head((features[idx] - mean) / std), dim=-1)
            loss = clip_loss(emb, caption_emb[caption_ids[idx]], temperature,
                             duplicate_mask(image_ids[idx], caption_ids[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch == epochs - 1:
                last.append(float(loss.detach()))
    return lambda x: F.normalize(head((x - mean) / std), dim=-1), sum(last) / max(1, len(last))


def scores(correct: list[float]) -> dict:
    return {"value": round(100 * sum(correct) / max(1, len(correct)), 2), "ci95": bootstrap_ci(correct, scale=100),
            "n": len(correct)}


@torch.no_grad()
def evaluate(embed, features, held_captions, encoder, facts, held_images) -> dict:
    emb = embed(features)
    gallery = sorted(set(held_captions))
    sims = emb @ encoder.encode(gallery).T
    own = torch.tensor([gallery.index(c) for c in held_captions])
    rank = (sims > sims[torch.arange(len(own)), own][:, None]).sum(1)  # captions scored above the image's own
    out = {"gallery": len(gallery)}
    for k in (1, 5):
        out[f"recall@{k}"] = scores([float(r < k) for r in rank.tolist()])
        out[f"recall@{k}"]["chance"] = round(100 * k / len(gallery), 2)
    prompts = {"modality": {m: f"This is {article(MODALITY_NAMES[m])} {MODALITY_NAMES[m]}." for m in MODALITIES},
               "organ": {o: f"This is a medical image of the {o}." for o in ORGANS}}
    for task, by_label in prompts.items():
        labels = list(by_label)
        pick = (emb @ encoder.encode(list(by_label.values())).T).argmax(1).tolist()
        truth = [facts[image][task] for image in held_images]
        rows = [(labels.index(t), p) for t, p in zip(truth, pick) if t is not None]
        counts = [sum(1 for t, _ in rows if t == i) for i in range(len(labels))]
        truth_ids, picks = [t for t, _ in rows], [p for _, p in rows]
        balanced = lambda t, p: balanced_accuracy(t, p, len(labels))  # noqa: E731
        out[task] = {**scores([float(t == p) for t, p in rows]), "prompts": by_label,
                     "balanced": {"value": round(balanced(truth_ids, picks), 2),
                                  "ci95": bootstrap_ci_paired(balanced, truth_ids, picks)},
                     "recall": {label: round(100 * sum(1 for t, p in rows if t == i == p) / max(1, counts[i]), 2)
                                for i, label in enumerate(labels)},
                     "chance_uniform": round(100 / len(labels), 2),
                     "majority": round(100 * max(counts) / max(1, len(rows)), 2),
                     "counts": dict(zip(labels, counts))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data", help="folder of prepared vqa-rad, slake, pathvqa")
    ap.add_argument("--pathvqa-images", type=int, default=700, help="PathVQA images kept (seeded subset)")
    ap.add_argument("--heldout", type=float, default=0.2, help="share of images held out")
    ap.add_argument("--epochs", default="10,60", help="training lengths to report, comma-separated")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="contrastive_probe.json")
    ap.add_argument("--features-cache", default="", help="a .pt file keeping the tower's features between runs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    records, facts = image_facts(Path(args.data), args.pathvqa_images, args.seed)
    captions = image_captions(records)
    images = sorted(captions)
    random.Random(args.seed).shuffle(images)
    cut = int(len(images) * (1 - args.heldout))
    train_images, held_images = images[:cut], images[cut:]
    cache = Path(args.features_cache) if args.features_cache else None
    if cache is not None and cache.is_file() and torch.load(cache)["images"] == images:
        features = torch.load(cache)["features"]
    else:
        features = pooled_features(images)
        if cache is not None:
            torch.save({"images": images, "features": features}, cache)
    t_features = time.perf_counter() - t0
    encoder = load_minilm()
    texts = sorted(set(captions.values()))
    caption_emb = encoder.encode(texts)
    caption_ids = torch.tensor([texts.index(captions[i]) for i in images])
    train_x, held_x = features[:cut], features[cut:]
    held_captions = [captions[i] for i in held_images]
    results = {"images": {"train": len(train_images), "heldout": len(held_images)},
               "distinct_train_captions": len(set(caption_ids[:cut].tolist())), "args": vars(args)}
    shuffled = caption_ids[:cut][torch.randperm(cut, generator=torch.Generator().manual_seed(1))]
    names = []
    for epochs in [int(e) for e in args.epochs.split(",")]:
        for kind, ids in (("trained", caption_ids[:cut]), ("shuffled_captions", shuffled)):
            embed, last_loss = train_head(train_x, ids, caption_emb, epochs, args.batch_size, args.lr,
                                          args.temperature, args.seed)
            names.append(f"{kind}_{epochs}ep")
            results[names[-1]] = {"last_epoch_loss": round(last_loss, 4),
                                  **evaluate(embed, held_x, held_captions, encoder, facts, held_images)}
    untrained, _ = train_head(train_x, caption_ids[:cut], caption_emb, 0, args.batch_size, args.lr, args.temperature, args.seed)
    results["untrained_head"] = evaluate(untrained, held_x, held_captions, encoder, facts, held_images)
    results["seconds"] = {"features": round(t_features, 1), "total": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(results, indent=2))
    for name in names + ["untrained_head"]:
        r = results[name]
        print(f"{name:22s} R@1 {r['recall@1']['value']:6.2f} {r['recall@1']['ci95']}  R@5 {r['recall@5']['value']:6.2f} "
              f"{r['recall@5']['ci95']}  modality {r['modality']['value']:6.2f} {r['modality']['ci95']}  "
              f"organ {r['organ']['value']:6.2f} {r['organ']['ci95']}  balanced modality {r['modality']['balanced']['value']:6.2f} "
              f"organ {r['organ']['balanced']['value']:6.2f}")
    print(json.dumps({k: results[k] for k in ("images", "distinct_train_captions", "seconds")}))


if __name__ == "__main__":
    main()
