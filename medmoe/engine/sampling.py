"""The next token of every running request, each by its own settings, and its log-probabilities.

Greedy rows take the argmax of their logits all at once; a sampling row runs the reference's
`pick_next` on its own logits with its own generator, so a seeded request draws what it would
draw alone. Log-probabilities are those of the model's distribution (log_softmax of the logits,
before temperature, top-k or top-p), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import torch

from ..generation.generate import SamplingConfig, pick_next
from .transfer import to_device

MAX_TOP_LOGPROBS = 20


def pick_tokens(logits: torch.Tensor, configs: list[SamplingConfig], generators: list) -> torch.Tensor:
    """[n] next tokens for logits [n, V] (float)."""
    tokens = logits.argmax(-1)
    for row, (cfg, generator) in enumerate(zip(configs, generators)):
        if cfg.do_sample:
            tokens[row] = pick_next(logits[row:row + 1], cfg, generator)[0]
    return tokens


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[n] log p of each row's token under the model's distribution (for answer confidences)."""
    logits = logits.float()
    return logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], top: list[int]):
    """Device tensors (log p(token) [k], top log-probs [k, K], their ids [k, K]) for the given rows
    (K the largest of `top`), or None; `logprobs_by_row` reads them once they are on the host."""
    if not rows:
        return None
    index = to_device(rows, logits.device)
    logp = logits.index_select(0, index).float().log_softmax(-1)
    chosen = logp.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    best = logp.topk(min(max(top), logp.shape[-1]), dim=-1)
    return chosen, best.values, best.indices


def logprobs_by_row(scores, rows: list[int], top: list[int]) -> dict[int, tuple[float, list[tuple[int, float]]]]:
    """row -> (log p(token), [(id, log p)] of its `top` most likely tokens, best first)."""
    if scores is None:
        return {}
    chosen, values, ids = (t.tolist() for t in scores)
    return {row: (chosen[i], list(zip(ids[i], values[i]))[: top[i]]) for i, row in enumerate(rows)}
