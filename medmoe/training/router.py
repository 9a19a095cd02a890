"""Router training, the official recipe (SPEC section 1, "Router training"):

1. Run the frozen phase-2 (dense) model on the question turn of each labelled sample
   (`<image>\\n{question}` up to "ASSISTANT:"), average the hidden states of all layers (the
   embedding output included, as `output_hidden_states` returns them) and all positions ->
   one d-vector per sample. Cached once in `router_features.safetensors`.
2. Train Linear(d, 4) with cross-entropy (Adam 1e-3, 10 epochs); label j = MODALITIES[j].
3. Report accuracy on a held-out part (a seeded split), per class as well.

Option `train_per_layer`: one router per MoE layer, trained on that layer's real FFN inputs (every
question token labelled with its sample's modality), which removes the train/use mismatch.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import MODALITIES
from ..data.templates import Turn
from ..errors import DataError
from ..moe.router import router_feature
from ..moe.upcycle import decoder_layers, ffn_attribute
from .data import field, question_text

ROUTER_FILE = "router.safetensors"


def labelled(records, modalities=MODALITIES, max_samples: int = 0, seed: int = 0) -> tuple[list, torch.Tensor]:
    """Records with a known modality, and their labels (index into `modalities`). With
    max_samples, a seeded random subset (so every dataset of a mixture is represented)."""
    keep = [r for r in records if field(r, "modality") in modalities]
    if max_samples and len(keep) > max_samples:
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:max_samples]
        keep = [keep[i] for i in sorted(order.tolist())]
    if not keep:
        raise DataError(f"no record has a modality among {list(modalities)}: the router needs labelled samples")
    return keep, torch.tensor([modalities.index(field(r, "modality")) for r in keep])


def _question_inputs(processor, record, max_length: int, device):
    enc = processor.encode([Turn(question_text(record), None)])
    ids = torch.tensor([enc.input_ids[:max_length]], device=device)
    image = field(record, "image")
    pixels = processor.image_tensor(image).unsqueeze(0).to(device) if image is not None else None
    return ids, pixels


def _question_batches(model, processor, records, max_length: int, batch_size: int, desc: str, progress: bool):
    """Yield (input embeddings, [B, S] attention mask, first record index) for right-padded
    batches of question turns. Under the causal mask the real positions never see the padding,
    so every sample's states are the ones it gets alone."""
    from tqdm.auto import tqdm

    model.eval()
    pad_id = processor.tokenizer.pad_token_id or 0
    with tqdm(total=len(records), desc=desc, disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            inputs = [_question_inputs(processor, r, max_length, model.device) for r in records[start:start + batch_size]]
            length = max(ids.shape[1] for ids, _ in inputs)
            ids = torch.full((len(inputs), length), pad_id, dtype=torch.long, device=model.device)
            mask = torch.zeros_like(ids)
            for row, (one, _) in enumerate(inputs):
                ids[row, : one.shape[1]], mask[row, : one.shape[1]] = one[0], 1
            images = [pixels for _, pixels in inputs if pixels is not None]
            yield model.embed_inputs(ids, torch.cat(images) if images else None), mask, start
            bar.update(len(inputs))


@torch.no_grad()
def pooled_features(model, processor, records, max_length: int = 512, progress: bool = True,
                    batch_size: int = 32) -> torch.Tensor:
    """[N, d]: mean over all layers' hidden states and all positions of the question turn."""
    out = []
    for embeds, mask, _ in _question_batches(model, processor, records, max_length, batch_size, "router features", progress):
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True,
                                      logits_to_keep=1).hidden_states
        out.append(router_feature(hidden, mask).cpu())
    return torch.cat(out)


@torch.no_grad()
def ffn_inputs(model, processor, records, layers: list[int], max_length: int = 512, progress: bool = True,
               batch_size: int = 32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: ([T, d] FFN inputs of every question token, [T] sample index)} from forward hooks,
    kept in bfloat16 on the CPU (2,000 samples x 15 layers of SmolLM2 take about 3.5 GB)."""
    blocks = decoder_layers(model.language_model)
    feats = {i: [] for i in layers}
    owners = []
    real = {}  # the current batch's mask: the hooks keep its real positions only

    def keep(i, ffn_input):
        feats[i].append(ffn_input[real["mask"]].to("cpu", torch.bfloat16))

    hooks = [getattr(blocks[i], ffn_attribute(blocks[i])).register_forward_hook(
        lambda mod, args, out, i=i: keep(i, args[0])) for i in layers]
    try:
        for embeds, mask, start in _question_batches(model, processor, records, max_length, batch_size,
                                                     "router FFN inputs", progress):
            real["mask"] = mask.bool()
            model.language_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)
            rows = torch.arange(start, start + mask.shape[0])
            owners.append(rows.repeat_interleave(mask.sum(1).cpu()))
    finally:
        for h in hooks:
            h.remove()
    owner = torch.cat(owners)
    return {i: (torch.cat(feats[i]), owner) for i in layers}


def heldout_split(n: int, fraction: float, seed: int, groups: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), seeded. With `groups` (the image of each sample), whole
    groups go to one side, so no held-out question shares its image with a training one."""
    groups = list(range(n)) if groups is None else list(groups)
    names = list(dict.fromkeys(groups))  # first-seen order: deterministic
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    target = max(1, round(n * fraction)) if n > 1 else 0
    held_names, count = set(), 0
    size = {name: 0 for name in names}
    for g in groups:
        size[g] += 1
    for i in order:
        if count >= target or count + size[names[i]] >= n:
            break
        held_names.add(names[i])
        count += size[names[i]]
    held = torch.tensor([i for i, g in enumerate(groups) if g in held_names], dtype=torch.long)
    train = torch.tensor([i for i, g in enumerate(groups) if g not in held_names], dtype=torch.long)
    return train, held


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 10, lr: float = 1e-3,
               batch_size: int = 32, seed: int = 0) -> torch.nn.Linear:
    """Linear(d, C) trained with cross-entropy and Adam, fp32 (whatever x is stored in), deterministic."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(head(x[idx].float()), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


@torch.no_grad()
def accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    if len(x) == 0:
        return {"accuracy": None, "n": 0, "per_class": {}}
    pred = head(x.float()).argmax(-1)
    per_class = {c: float((pred[y == c] == c).float().mean()) for c in range(num_classes) if (y == c).any()}
    return {"accuracy": float((pred == y).float().mean()), "n": len(x), "per_class": per_class}


def train_router(x: torch.Tensor, y: torch.Tensor, modalities=MODALITIES, epochs: int = 10, lr: float = 1e-3,
                 batch_size: int = 32, heldout_fraction: float = 0.1, seed: int = 0, groups: list | None = None):
    """(Linear head, metrics): fit on the training part, accuracy on train and held-out parts
    (held out by group, i.e. by image, when groups are given)."""
    train_idx, held_idx = heldout_split(len(x), heldout_fraction, seed, groups)
    head = fit_linear(x[train_idx], y[train_idx], len(modalities), epochs, lr, batch_size, seed)
    held = accuracy(head, x[held_idx], y[held_idx], len(modalities))
    metrics = {"train_accuracy": accuracy(head, x[train_idx], y[train_idx], len(modalities))["accuracy"],
               "heldout_accuracy": held["accuracy"], "heldout_n": held["n"], "train_n": len(train_idx),
               "heldout_per_class": {modalities[c]: a for c, a in held["per_class"].items()},
               "label_counts": {m: int((y == c).sum()) for c, m in enumerate(modalities)},
               "label_order": list(modalities)}
    return head, metrics


def run_router_phase(model, processor, records, cfg, out_dir: str, moe_layers: list[int], seed: int = 0,
                     modalities=MODALITIES) -> dict:
    """Features (cached once), the shared router, and optionally per-layer routers. Writes
    router.safetensors (`weight`, `bias`, and `layers.{i}.weight/bias`) and router_metrics.json."""
    os.makedirs(out_dir, exist_ok=True)
    records, y = labelled(records, modalities, cfg.max_samples, seed)
    cache = os.path.join(out_dir, "router_features.safetensors")
    if os.path.isfile(cache) and load_file(cache)["labels"].tolist() == y.tolist():
        x = load_file(cache)["features"]
    else:
        x = pooled_features(model, processor, records, cfg.max_length)
        save_file({"features": x.contiguous(), "labels": y}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    images = [field(r, "image") or f"#{i}" for i, r in enumerate(records)]
    images = [img if isinstance(img, str) else f"#{i}" for i, img in enumerate(images)]  # in-memory images: one group each
    head, metrics = train_router(x, y, modalities, cfg.epochs, cfg.lr, cfg.batch_size, cfg.heldout_fraction, seed, images)
    metrics["heldout_by"] = "image"
    tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    if cfg.train_per_layer:
        metrics["per_layer"] = {}
        for layer, (tokens, owner) in ffn_inputs(model, processor, records, moe_layers, cfg.max_length).items():
            # A batch of about as many samples' tokens as the pooled router's batch has samples:
            # the same number of optimizer steps, not one step per 32 tokens.
            token_batch = cfg.batch_size * max(1, len(tokens) // len(records))
            layer_head, m = train_router(tokens, y[owner], modalities, cfg.epochs, cfg.lr, token_batch,
                                         cfg.heldout_fraction, seed, [images[i] for i in owner.tolist()])
            tensors[f"layers.{layer}.weight"] = layer_head.weight.detach().contiguous()
            tensors[f"layers.{layer}.bias"] = layer_head.bias.detach().contiguous()
            metrics["per_layer"][layer] = {"heldout_token_accuracy": m["heldout_accuracy"]}
    path = os.path.join(out_dir, ROUTER_FILE)
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "router_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def load_router_weights(model, path: str) -> None:
    """Put trained router weights into an upcycled model (shared router and/or per-layer routers)."""
    from ..errors import CheckpointError

    tensors = load_file(path)
    with torch.no_grad():
        if model.router is not None:
            if tensors["weight"].shape != model.router.weight.shape:
                raise CheckpointError(f"{path}: router shape {tuple(tensors['weight'].shape)} does not fit the model's "
                                      f"{tuple(model.router.weight.shape)} (moe.num_experts must equal the number of modalities)")
            model.router.weight.copy_(tensors["weight"])
            model.router.bias.copy_(tensors["bias"])
        for block in model.moe_blocks:
            if block.router is None:
                continue
            key = f"layers.{block.layer_idx}"
            if f"{key}.weight" not in tensors:  # no per-layer router trained: start from the shared one
                key = None
            block.router.weight.copy_(tensors[f"{key}.weight" if key else "weight"])
            block.router.bias.copy_(tensors[f"{key}.bias" if key else "bias"])
