"""An answer's confidence (engine/confidence.py): a yes/no answer against the other answer, any other
answer by the geometric mean of its tokens' probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from medmoe.engine.confidence import ClosedCandidates, answer_confidence

YES, NO = [5, 6], [7, 8]  # the token ids each answer may start with ("yes", "Yes" / "no", "No")


class Spellings:
    """A processor whose answers start with the given tokens."""

    def __init__(self, starts: dict[str, int]):
        self.starts = starts

    def answer_start_ids(self, answers):
        return list(dict.fromkeys(self.starts[a] for a in answers))


def test_candidate_logprobs_sum_each_answers_spellings():
    candidates = ClosedCandidates([YES, NO], torch.device("cpu"))
    logits = torch.randn(3, 12)
    logp = logits.log_softmax(-1)
    got = candidates.logprobs(logits)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got[:, 0].exp(), logp[:, YES].exp().sum(-1))
    torch.testing.assert_close(got[:, 1].exp(), logp[:, NO].exp().sum(-1))


@pytest.mark.parametrize("text,first,expected", [("Yes", 6, 0), (" yes. ", 5, 0), ("No!", 8, 1), ("no", 7, 1),
                                                 ("Yes", 7, None),  # spelled by another token: not rated as "yes"
                                                 ("Yes, a fracture", 6, None), ("CT", 5, None)])
def test_which_closed_answer_an_answer_is(text, first, expected):
    assert ClosedCandidates([YES, NO], torch.device("cpu")).chosen(text, first) == expected


def test_a_yes_answer_is_rated_against_no_and_others_by_their_tokens():
    candidates = ClosedCandidates([YES, NO], torch.device("cpu"))
    at_first = [math.log(0.3), math.log(0.1)]  # p(yes) 0.3, p(no) 0.1, 0.6 elsewhere
    assert answer_confidence(math.log(0.2), [6], "Yes", candidates, at_first) == pytest.approx(0.75)
    assert answer_confidence(math.log(0.2), [8], "No", candidates, at_first) == pytest.approx(0.25)
    two_tokens = math.log(0.5) + math.log(0.8)
    assert answer_confidence(two_tokens, [1, 2], "CT scan", candidates, at_first) == pytest.approx(math.sqrt(0.4))
    assert answer_confidence(math.log(0.2), [6], "Yes", None, None) == pytest.approx(0.2)  # no candidates
    assert answer_confidence(0.0, [], "", candidates, at_first) is None


def test_no_candidates_where_the_first_token_cannot_tell_yes_from_no():
    shared = Spellings({"yes": 1, "Yes": 1, "no": 1, "No": 1})  # a byte-level tokenizer's leading space
    assert ClosedCandidates.of(shared, torch.device("cpu")) is None
    apart = ClosedCandidates.of(Spellings({"yes": 5, "Yes": 6, "no": 7, "No": 8}), torch.device("cpu"))
    assert apart.ids == [YES, NO]


def test_an_answer_is_withheld_only_below_a_set_threshold():
    from medmoe.serving.api import Answer

    answer = Answer("Yes", None, confidence=0.55)
    assert not answer.withheld(None) and not answer.withheld(0.5) and answer.withheld(0.6)
    assert Answer("", None, confidence=None).withheld(0.1)  # no answer token: nothing to vouch for
