"""Golden values for every metric, computed by hand (the arithmetic is in the comments)."""

import math

import pytest

from medmoe.evaluation.metrics import (aggregate, bleu, closed_strict, closed_substring, ems, normalize,
                                       normalize_answer_type, open_recall, score_item, token_prf)


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"),                         # period not followed by a digit is removed
    ("3.5 cm.", "3.5 cm"),                   # decimal point kept
    ("There are two kidneys", "there are 2 kidneys"),  # number words -> digits
    ("None", "0"),                           # the official map sends "none" to 0 too
    ("twenty", "twenty"),                    # only zero..ten are mapped
    ("The left lung", "left lung"),          # articles dropped
    ("a, b", "b"),                           # "a" is an article; comma touching a space is deleted
    ("dont know", "don't know"),             # contractions: the apostrophe is restored, not expanded
    ("don't", "don't"),
    ("left-sided (lung)", "left sided lung"),  # '-' between letters -> space; '(' after a space -> deleted
    ("x - ray", "x ray"),
    ("1,000 cells", "1000 cells"),           # digit,digit: punctuation deleted, not spaced
    ("Is it CT?", "is it ct"),
])
def test_normalize(text, expected):
    assert normalize(text) == expected
    assert normalize(expected) == expected


def test_closed_substring_traps_and_strict():
    assert closed_substring("not sure", "no") == 1.0   # official rule: 'no' inside 'not'
    assert closed_strict("not sure", "no") == 0.0
    assert closed_substring("The eyes are normal", "yes") == 1.0  # 'yes' inside 'eyes'
    assert closed_strict("The eyes are normal", "yes") == 0.0
    assert closed_substring("Yes.", "yes") == closed_strict("Yes.", "yes") == 1.0
    assert closed_substring("No", "Yes") == closed_strict("No", "Yes") == 0.0
    assert closed_substring("Left", "left") == 1.0  # case-insensitive
    assert closed_strict("two", "2") == 1.0         # number words
    assert closed_substring("two", "2") == 0.0      # the official rule does not normalise


def test_open_recall_number_words():
    # pred tokens {there, are, 2, kidneys}, gt {2}: tp = 1, fp = 3, fn = 0
    f1, p, r = token_prf("There are two kidneys", "2")
    assert (p, r) == (0.25, 1.0)
    assert f1 == pytest.approx(2 * 0.25 * 1 / 1.25)  # 0.4
    assert ems("There are two kidneys", "2") == 0.25  # 1 distinct gt word found / 4 prediction words
    assert bleu("There are two kidneys", "2", 1) == 0.0  # BLEU is not normalised: 'two' != '2'


def test_open_multiplicities():
    # pred lung:2 liver:1, gt lung:1 heart:1 -> tp = 2 (pred count), fp = 1, fn = 1
    f1, p, r = token_prf("lung lung liver", "lung heart")
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3) and f1 == pytest.approx(2 / 3)
    assert open_recall("lung lung liver", "lung heart") == pytest.approx(2 / 3)
    assert ems("lung lung liver", "lung heart") == pytest.approx(1 / 3)  # 1 distinct gt word / 3 words


def test_open_precision_and_recall_are_not_swapped():
    # pred {left, lung}, gt {left, lower, lung}: tp = 2, fp = 0, fn = 1 -> precision 1, recall 2/3
    f1, p, r = token_prf("left lung", "left lower lung")
    assert (p, r) == (1.0, pytest.approx(2 / 3)) and f1 == pytest.approx(0.8)
    assert open_recall("left lung", "left lower lung") == pytest.approx(2 / 3)
    # pred {there, are, 2, kidneys}, gt {2}: precision 1/4, recall 1 (the paper's score forgives extra words)
    assert open_recall("There are two kidneys", "2") == 1.0
    short = score_item("left lung", "left lower lung", "OPEN")
    wordy = score_item("There are two kidneys", "2", "OPEN")
    assert (short["precision"], short["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (wordy["precision"], wordy["recall"]) == (0.25, 1.0)
    agg = aggregate([("OPEN", short), ("OPEN", wordy)])["open"]
    assert agg["precision"] == pytest.approx(100 * (1 + 0.25) / 2)  # 62.5
    assert agg["recall"] == pytest.approx(100 * (2 / 3 + 1) / 2)     # 83.3
    assert agg["f1"] == pytest.approx(100 * (0.8 + 0.4) / 2)


def test_open_empty_and_no_overlap():
    assert token_prf("", "lung") == (0.0, 0.0, 0.0)
    assert token_prf("lung", "") == (0.0, 0.0, 0.0)
    assert token_prf("heart", "lung") == (0.0, 0.0, 0.0)
    assert ems("", "lung") == 0.0
    assert token_prf("the", "lung") == (0.0, 0.0, 0.0)  # only an article: empty after normalising


def test_bleu_hand_computed():
    # hyp [left, lung], ref [the, left, lung]: brevity penalty exp(1 - 3/2)
    bp = math.exp(-0.5)
    assert bleu("left lung", "the left lung", 1) == pytest.approx(bp)        # p1 = 2/2
    assert bleu("left lung", "the left lung", 2) == pytest.approx(bp)        # p2 = 1/1
    assert bleu("left lung", "the left lung", 3) == pytest.approx(0.1 * bp)  # no trigram: smoothed 0.1/1
    # hyp [a, b, c, d] vs ref [a, b, x, d]: same length (bp 1); p1 = 3/4, p2 = 1/3 (only 'a b'), p3 = 0 -> 0.1/2
    assert bleu("a b c d", "a b x d", 1) == pytest.approx(0.75)
    assert bleu("a b c d", "a b x d", 2) == pytest.approx(1 / 3)
    assert bleu("a b c d", "a b x d", 3) == pytest.approx(0.05)
    assert bleu("", "lung", 1) == 0.0
    assert bleu("Lung", "lung", 1) == 1.0  # lower-cased


def test_answer_type_and_aggregate():
    assert normalize_answer_type("CLOSED ") == "CLOSED" and normalize_answer_type("open") == "OPEN"
    with pytest.raises(ValueError):
        normalize_answer_type("maybe")
    items = [("CLOSED", score_item("not", "no", "CLOSED")),     # substring 1, strict 0
             ("CLOSED", score_item("yes", "yes", "CLOSED")),    # 1, 1
             ("OPEN", score_item("lung lung liver", "lung heart", "OPEN")),  # recall 2/3
             ("OPEN", score_item("left lung", "the left lung", "OPEN"))]     # recall 1
    agg = aggregate(items)
    assert agg["n"] == 4
    assert agg["closed"]["n"] == 2 and agg["closed"]["accuracy"] == 100.0 and agg["closed"]["accuracy_strict"] == 50.0
    assert agg["open"]["recall"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert agg["open"]["ems"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert aggregate([("OPEN", items[2][1])])["closed"] is None
