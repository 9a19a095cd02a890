"""How sure the model is of an answer, as a probability in [0, 1] (docs/serving.md, "Confidence").

- A closed answer, "yes" or "no": the probability of the chosen answer among the two candidates,
  p(yes) / (p(yes) + p(no)) at the answer's first token (each side summed over its spellings, "yes"
  and "Yes"). Probability that went to neither answer does not count against it: the question is
  closed, the model chose between two.
- Any other answer: the geometric mean of its tokens' probabilities (a one-token answer gets that
  token's probability).
"""

from __future__ import annotations

import math

import torch

# Closed answers and the spellings a generated answer may start with.
CLOSED_ANSWERS = {"yes": ("yes", "Yes"), "no": ("no", "No")}


class ClosedCandidates:
    """The first tokens of the closed answers under one processor's template, and their log-probabilities."""

    def __init__(self, ids: list[list[int]], device: torch.device):
        self.names = list(CLOSED_ANSWERS)
        self.ids = ids
        self.groups = [torch.tensor(group, device=device) for group in ids]

    @classmethod
    def of(cls, processor, device: torch.device) -> "ClosedCandidates | None":
        """The candidates under `processor`'s tokenizer, or None where two answers start with the
        same token (a byte-level tokenizer's space): their first token cannot tell them apart."""
        ids = [processor.answer_start_ids(spellings) for spellings in CLOSED_ANSWERS.values()]
        if len({t for group in ids for t in group}) < sum(len(group) for group in ids):
            return None
        return cls(ids, device)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, candidates]: log p that the next token starts each candidate (logits [rows, V])."""
        logp = logits.float().log_softmax(-1)
        return torch.stack([logp.index_select(1, ids).logsumexp(-1) for ids in self.groups], -1)

    def chosen(self, text: str, first_token: int) -> int | None:
        """Index of the candidate the answer is, or None: not a closed answer, or one that does not
        start with a candidate's token."""
        word = text.strip().rstrip(".!").strip().lower()
        if word not in self.names:
            return None
        k = self.names.index(word)
        return k if first_token in self.ids[k] else None


def answer_confidence(logprob_sum: float, tokens: list[int], text: str, candidates: ClosedCandidates | None,
                      candidate_logprobs: list[float] | None) -> float | None:
    """The confidence of a finished answer (None: no answer token)."""
    if not tokens:
        return None
    if candidates is not None and candidate_logprobs is not None:
        k = candidates.chosen(text, tokens[0])
        if k is not None:
            return math.exp(candidate_logprobs[k] - torch.tensor(candidate_logprobs).logsumexp(0).item())
    return math.exp(logprob_sum / len(tokens))
