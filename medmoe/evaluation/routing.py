"""Which domain expert each MoE layer picks, for image tokens and for text tokens, per image
modality (the paper's Figure 5), and how often the router's choice on image tokens names the
image's true modality (router j is meant for MODALITIES[j]).

Feed it the `routing` of forward passes run with `output_routing=True` (generation returns the
routing of the prompt tokens), the prompt ids, which positions are real (not padding) and each
sample's modality.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..config import MODALITIES

KINDS = ("image", "text")


def sample_counts(routing, input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int | None) -> list[dict]:
    """Per sample: {"image": [layers][experts] token counts, "text": same, "image_top1": [experts]
    top-1 choices on image tokens summed over layers}. Plain lists, so they can be stored as JSON."""
    num_experts = routing[0].probs.shape[-1]
    valid = valid.bool().cpu()
    is_image = (input_ids.cpu() == image_token_id) if image_token_id is not None else torch.zeros_like(valid)
    choice = torch.stack([r.expert_index.cpu() for r in routing], dim=2)  # [B, S, layers, k]
    return [_counts(choice[b][valid[b]], is_image[b][valid[b]], num_experts) for b in range(choice.shape[0])]


def prompt_counts(routing, prompt_ids: list[int], image_token_id: int | None) -> dict:
    """`sample_counts` of one prompt from its own records (an engine Result's `prompt_routing`:
    per layer [1, tokens, k]), without a padded batch."""
    choice = torch.stack([r.expert_index[0].cpu() for r in routing], dim=1)  # [tokens, layers, k]
    ids = torch.tensor(prompt_ids)
    is_image = ids == image_token_id if image_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
    return _counts(choice, is_image, routing[0].probs.shape[-1])


def _counts(choice: torch.Tensor, is_image: torch.Tensor, num_experts: int) -> dict:
    """choice [tokens, layers, k] of one sample's real tokens, is_image [tokens]."""
    layers = choice.shape[1]
    offsets = torch.arange(layers)[None, :, None] * num_experts  # (layer, expert) pairs as one index
    counts = {}
    for kind, mask in (("image", is_image), ("text", ~is_image)):
        picked = choice[mask]  # [tokens, layers, k]
        pairs = torch.bincount((picked + offsets).flatten(), minlength=layers * num_experts)
        counts[kind] = pairs.view(layers, num_experts).tolist()
        if kind == "image":
            counts["image_top1"] = torch.bincount(picked[..., 0].flatten(), minlength=num_experts).tolist()
    return counts


class RoutingStats:
    def __init__(self, modalities: Sequence[str] = MODALITIES):
        self.modalities = tuple(modalities)
        self.layers: list[int] = []
        self.num_experts = 0
        self.counts: dict[tuple[str, str], torch.Tensor] = {}  # (kind, modality) -> [layers, experts] token counts
        self.samples: list[tuple[str, int, Counter]] = []  # (modality, image tokens, expert votes on image tokens)

    def add(self, routing, input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int | None,
            modalities: Sequence[str]) -> None:
        """routing: list of LayerRouting (expert_index [B,S,k]); valid [B,S] True on real tokens."""
        if routing:
            self.layers = self.layers or [r.layer for r in routing]
            for modality, counts in zip(modalities, sample_counts(routing, input_ids, valid, image_token_id)):
                self.add_sample(modality, counts)

    def add_sample(self, modality: str, counts: dict) -> None:
        """counts: one entry of `sample_counts` (also how evaluation stores routing per item)."""
        self.num_experts = self.num_experts or len(counts["image_top1"])
        for kind in KINDS:
            c = torch.tensor(counts[kind], dtype=torch.long)
            if c.sum() > 0:
                key = (kind, modality)
                self.counts[key] = self.counts.get(key, 0) + c
        votes = Counter({j: v for j, v in enumerate(counts["image_top1"]) if v})
        self.samples.append((modality, sum(counts["image_top1"]), votes))

    def router_accuracy(self) -> dict:
        """Top-1 expert on image tokens vs the true modality, per token and per sample (majority
        over all image tokens and MoE layers), over samples whose modality the router knows."""
        tokens = hits = samples = sample_hits = 0
        per_modality: dict[str, list[int]] = {}
        for modality, n_image, votes in self.samples:
            if modality not in self.modalities or n_image == 0:
                continue
            target = self.modalities.index(modality)
            tokens += sum(votes.values())
            hits += votes[target]
            correct = int(votes.most_common(1)[0][0] == target)
            samples += 1
            sample_hits += correct
            per_modality.setdefault(modality, []).append(correct)
        return {"samples": samples,
                "sample_accuracy": 100.0 * sample_hits / samples if samples else None,
                "token_accuracy": 100.0 * hits / tokens if tokens else None,
                "per_modality": {m: 100.0 * sum(v) / len(v) for m, v in sorted(per_modality.items())}}

    def shares(self) -> dict:
        """{kind: {modality: [[share of tokens per expert] per layer]}} in percent."""
        out: dict = {}
        for (kind, modality), counts in sorted(self.counts.items()):
            c = counts.double()
            out.setdefault(kind, {})[modality] = (100 * c / c.sum(-1, keepdim=True).clamp(min=1)).tolist()
        return out

    def summary(self) -> dict:
        return {"layers": self.layers, "num_experts": self.num_experts, "expert_names": self.expert_names(),
                "samples": len(self.samples), "shares": self.shares(), "router_accuracy": self.router_accuracy()}

    def expert_names(self) -> list[str]:
        return [f"{j}:{self.modalities[j]}" if j < len(self.modalities) else str(j) for j in range(self.num_experts)]


def plot_routing(summary: dict, path) -> bool:
    """Heatmaps, one per (token kind, modality): MoE layer x expert, share of tokens. False when
    there is nothing to plot (a dense model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = summary["shares"]
    modalities = sorted({m for kind in shares.values() for m in kind})
    if not modalities:
        return False
    kinds = [k for k in KINDS if k in shares]
    layers, names = summary["layers"], summary["expert_names"]
    row_height = 0.7 + max(1.2, 0.22 * len(layers))
    fig, axes = plt.subplots(len(kinds), len(modalities), squeeze=False, layout="constrained",
                             figsize=(1.5 + 2.4 * len(modalities), 1.4 + row_height * len(kinds)))
    image = None
    for r, kind in enumerate(kinds):
        for c, modality in enumerate(modalities):
            ax = axes[r][c]
            data = shares[kind].get(modality)
            if data is None:
                ax.axis("off")
                continue
            image = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
            ax.set_title(f"{modality}: {kind} tokens", fontsize=9)
            ax.set_xticks(range(len(names)), names if r == len(kinds) - 1 else [], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
            if c == 0:
                ax.set_ylabel("MoE layer")
    if image is not None:
        fig.colorbar(image, ax=axes, fraction=0.025, label="% of tokens routed to expert")
    fig.supxlabel("domain expert (j: the modality it is trained for)", fontsize=9)
    fig.suptitle("Domain expert chosen per MoE layer, by image modality and token kind", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
