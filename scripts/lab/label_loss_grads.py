"""How large is the label loss next to the answer loss, where it matters: at the projector and the
tower? A CPU measurement behind the weight of `nano-label-loss` (docs/lab/nano-v2.md).

For a model and a few seeded batches of phase-2 training records, it computes the answer loss and
the unweighted label loss (training/label_loss.py, fresh heads as at the start of a phase), and
the gradient norm each gives the projector's and the vision tower's weights. A weight w puts the
label term's gradient at w times the ratio printed.

    python scripts/lab/label_loss_grads.py --model nano --data data/vqa-rad data/slake --batches 3 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from medmoe.loading import load_model
from medmoe.training.data import Collate, load_records, records_dataset
from medmoe.training.label_loss import LabelLoss


def grad_norm(loss: torch.Tensor, params: list) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nano")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, processor = load_model(args.model)
    records = load_records(args.data)
    labels = LabelLoss(records, weight=1.0)
    labels.attach(model, seed=args.seed)
    model.requires_grad_(False)
    model.vision_tower.freeze(False)
    parts = {"projector": list(model.projector.parameters()), "vision_tower": list(model.vision_tower.parameters())}
    for ps in parts.values():
        for p in ps:
            p.requires_grad_(True)
    model.train()
    dataset = records_dataset(records, processor, "medmoe", args.max_length)
    picks = random.Random(args.seed).sample(range(len(records)), args.batches * args.batch_size)
    rows = []
    for b in range(args.batches):
        batch = Collate(processor)([dataset[i] for i in picks[b * args.batch_size:(b + 1) * args.batch_size]])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"], return_logits=False)
        label = labels(model, batch)["label_loss"]
        row = {"answer_loss": float(out.loss.detach()), "label_loss": float(label.detach())}
        for name, ps in parts.items():
            row[f"{name}_grad_answer"] = grad_norm(out.loss, ps)
            row[f"{name}_grad_label"] = grad_norm(label, ps)
        rows.append(row)
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    for name in parts:
        mean[f"{name}_ratio_label_to_answer"] = mean[f"{name}_grad_label"] / mean[f"{name}_grad_answer"]
    print(json.dumps({"mean": {k: round(v, 4) for k, v in mean.items()}, "classes": labels.counts()}))


if __name__ == "__main__":
    main()
