"""VQA metrics exactly as the Med-MoE paper computes them (its `run_eval.py`, which calls
LLaVA-Med's `eval_metrics`), plus a strict closed accuracy beside the lenient official one.

Every function scores one (prediction, ground truth) pair; `aggregate` averages a list of them.
The official normalisation has quirks that change numbers; they are reproduced on purpose and
documented in docs/evaluation.md:
- `normalize` only *restores* apostrophes ("dont" -> "don't"); it never splits contractions.
- "none" becomes "0" like the number words zero..ten; larger number words are kept.
- a period is removed unless a digit follows it ("3.5" stays, "yes." -> "yes").
- each punctuation mark becomes a space, or is deleted when it already touches a space (or when
  the text contains a digit-comma-digit group anywhere).
- closed accuracy is a substring test on the lower-cased raw strings: "no" is found in "not",
  "yes" in "eyes". `closed_strict` compares the normalised strings instead.
- BLEU-n uses n-gram precision of order n alone (weights (0,..,1,..)), not cumulative BLEU, on
  lower-cased whitespace tokens (not normalised), with NLTK's smoothing method 1.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter

from .intervals import bootstrap_ci

# Contractions written without their apostrophes are mapped back to the apostrophe form (the
# VQA convention LLaVA-Med copied). A key is a form below with exactly one apostrophe dropped.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've "
    "shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're "
    "you've"
).split()
CONTRACTIONS = {form[:i] + form[i + 1:]: form for form in _CONTRACTIONS for i, ch in enumerate(form) if ch == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # an inverted entry in the official table, kept for parity

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # the official regex meant "not between digits"; it only checks the right side
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def normalize(text: str) -> str:
    """LLaVA-Med's `normalize_word`: punctuation, periods, lower case, number words, articles,
    contractions, commas. Deterministic and idempotent on its own output."""
    out = text
    keeps_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        touches_space = (p + " " in text) or (" " + p in text)
        out = out.replace(p, "" if touches_space or keeps_digit_comma else " ")
    out = _PERIOD.sub("", out, count=32)  # the official call passed re.UNICODE (=32) as the count
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def tokens(text: str) -> Counter:
    """Word multiplicities of the normalised text."""
    return Counter(normalize(text).split())


# ----- closed questions ----------------------------------------------------------------------
def closed_substring(prediction: str, answer: str) -> float:
    """Official closed accuracy: the lower-cased answer occurs anywhere in the lower-cased
    prediction. Lenient: 'no' matches 'not', 'yes' matches 'eyes'."""
    return float(answer.lower() in prediction.lower())


def closed_strict(prediction: str, answer: str) -> float:
    """Strict closed accuracy: the normalised prediction equals the normalised answer."""
    return float(normalize(prediction) == normalize(answer))


# ----- open questions ------------------------------------------------------------------------
def token_prf(prediction: str, answer: str) -> tuple[float, float, float]:
    """(F1, precision, recall) over normalised word counts, the official `calculate_f1score`:
    tp = prediction counts of words in both, fp = prediction counts of words only predicted,
    fn = answer counts of words missing from the prediction. All 0 when either side is empty or
    nothing overlaps."""
    pred, gold = tokens(prediction), tokens(answer)
    if not pred or not gold:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred.items() if w in gold)
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp = sum(c for w, c in pred.items() if w not in gold)
    fn = sum(c for w, c in gold.items() if w not in pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def open_recall(prediction: str, answer: str) -> float:
    """The paper's open-question score ("recall")."""
    return token_prf(prediction, answer)[2]


def ems(prediction: str, answer: str) -> float:
    """The official "exact match score": distinct answer words found in the prediction divided by
    the number of prediction words (with multiplicity). Not an exact match; 0 for an empty
    prediction."""
    pred, gold = tokens(prediction), tokens(answer)
    total = sum(pred.values())
    return sum(1 for w in gold if w in pred) / total if total else 0.0


def bleu(prediction: str, answer: str, n: int) -> float:
    """Sentence BLEU with only the order-n precision weighted (NLTK, smoothing method 1), on
    lower-cased whitespace tokens, as the official `run_eval.py` calls it."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    weights = tuple(1.0 if i == n - 1 else 0.0 for i in range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on every zero n-gram count
        return float(sentence_bleu([answer.lower().split()], prediction.lower().split(), weights=weights,
                                   smoothing_function=SmoothingFunction().method1))


# ----- one item and averages ------------------------------------------------------------------
OPEN, CLOSED = "OPEN", "CLOSED"
CLOSED_METRICS = ("accuracy", "accuracy_strict", "f1")
OPEN_METRICS = ("recall", "ems", "f1", "precision", "bleu1", "bleu2", "bleu3")


def normalize_answer_type(value: str) -> str:
    """'CLOSED ' / 'close' / 'closed' -> 'CLOSED'; 'open' -> 'OPEN'."""
    v = str(value).strip().upper()
    if v in ("CLOSE", "CLOSED"):
        return CLOSED
    if v == "OPEN":
        return OPEN
    raise ValueError(f"answer_type {value!r} is neither OPEN nor CLOSED")


def score_item(prediction: str, answer: str, answer_type: str) -> dict[str, float]:
    """Per-item scores (fractions in [0, 1]) for the metrics of its answer type."""
    f1, precision, recall = token_prf(prediction, answer)
    if normalize_answer_type(answer_type) == CLOSED:
        return {"accuracy": closed_substring(prediction, answer), "accuracy_strict": closed_strict(prediction, answer),
                "f1": f1}
    return {"recall": recall, "ems": ems(prediction, answer), "f1": f1, "precision": precision,
            "bleu1": bleu(prediction, answer, 1), "bleu2": bleu(prediction, answer, 2),
            "bleu3": bleu(prediction, answer, 3)}


def aggregate(items: list[tuple[str, dict[str, float]]]) -> dict:
    """Average (answer_type, scores) pairs into percentages, each with its 95% bootstrap interval
    (questions resampled): {"n", "closed": {"n", metric: %..., "ci95": {metric: [low, high]}} | None,
    "open": {...} | None}."""
    out: dict = {"n": len(items)}
    for kind, names in ((CLOSED, CLOSED_METRICS), (OPEN, OPEN_METRICS)):
        group = [s for t, s in items if t == kind]
        out[kind.lower()] = ({"n": len(group), **{m: 100.0 * math.fsum(s[m] for s in group) / len(group) for m in names},
                              "ci95": {m: bootstrap_ci([s[m] for s in group], scale=100.0) for m in names}}
                             if group else None)
    return out
