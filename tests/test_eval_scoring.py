"""Scoring files by id: our format and the official one, missing/extra ids, clear errors."""

import json

import pytest

from medmoe.cli import main
from medmoe.errors import DataError
from medmoe.evaluation.scoring import read_ground_truth, read_predictions, score_files

RECORDS = [
    {"id": "q1", "image": "a.jpg", "question": "Is there a mass?", "answer": "No", "answer_type": "CLOSED",
     "modality": "CT", "dataset": "slake", "split": "test", "language": "en", "question_type": "Abnormality"},
    {"id": "q2", "image": "a.jpg", "question": "Which organ?", "answer": "Left lung", "answer_type": "OPEN",
     "modality": "CT", "dataset": "slake", "split": "test", "language": "en", "question_type": "Organ"},
    {"id": "q3", "image": "b.jpg", "question": "How many kidneys?", "answer": "2", "answer_type": "OPEN ",
     "modality": "MRI", "dataset": "vqa-rad", "split": "test", "language": "en"},
    {"id": "q4", "image": "b.jpg", "question": "Is it normal?", "answer": "yes", "answer_type": "CLOSED ",
     "modality": "MRI", "dataset": "vqa-rad", "split": "test", "language": "en"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def gt(tmp_path):
    return write_jsonl(tmp_path / "gt.jsonl", RECORDS)


def test_match_by_id_not_order(tmp_path, gt):
    # reversed order, and the trap 'not' for 'No'
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "q4", "prediction": "The eyes are fine"}, {"id": "q3", "prediction": "two"},
        {"id": "q2", "prediction": "the left lung"}, {"id": "q1", "prediction": "not sure"}])
    m, rows = score_files(preds, gt)
    assert m["counts"]["missing"] == m["counts"]["extra"] == 0
    assert m["total"]["closed"]["accuracy"] == 100.0       # both substring traps count as correct
    assert m["total"]["closed"]["accuracy_strict"] == 0.0  # ... and neither strictly
    assert m["total"]["open"]["recall"] == 100.0
    assert m["by"]["dataset"]["slake"]["n"] == 2
    assert m["by"]["modality"]["MRI"]["open"]["recall"] == 100.0
    assert m["by"]["answer_type"]["CLOSED"]["closed"]["n"] == 2
    assert set(m["by"]["question_type"]) == {"Abnormality", "Organ", "unknown"}


def test_official_formats(tmp_path):
    llava = [{"id": r["id"], "image": r["image"], "answer_type": r["answer_type"],
              "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                                {"from": "gpt", "value": r["answer"]}]} for r in RECORDS]
    (tmp_path / "vqa-rad").mkdir()
    gt = tmp_path / "vqa-rad" / "test.json"  # the official layout: DATASET/test.json
    gt.write_text(json.dumps(llava))
    preds = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "q1", "prompt": "x", "text": "No", "answer_id": "z"},
        {"question_id": "q2", "text": "heart"}, {"question_id": "q3", "text": "2"},
        {"question_id": "q9", "text": "yes"}])
    items = read_ground_truth(gt)
    assert [i.question for i in items][0] == "Is there a mass?" and items[0].dataset == "vqa-rad"
    m, _ = score_files(preds, gt)
    assert m["counts"]["missing"] == 1 and m["counts"]["missing_ids"] == ["q4"]
    assert m["counts"]["extra"] == 1 and m["counts"]["extra_ids"] == ["q9"]
    assert m["total"]["closed"]["accuracy"] == 50.0  # q4 missing counts as wrong
    assert m["total"]["open"]["recall"] == 50.0
    m2, _ = score_files(preds, gt, only_predicted=True)
    assert m2["total"]["closed"]["accuracy"] == 100.0 and m2["counts"]["scored"] == 3


def test_bad_json_names_file_and_line(tmp_path, gt):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "q1", "prediction": "no"}\n{"id": "q2", "prediction": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        read_predictions(bad)
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"qid": 1, "answer": "x"}])
    with pytest.raises(DataError, match=r"w\.jsonl:1.*'id' and 'prediction'"):
        read_predictions(wrong)
    dup = write_jsonl(tmp_path / "dup.jsonl", RECORDS + RECORDS[:1])
    with pytest.raises(DataError, match="twice"):
        read_ground_truth(dup)


def test_cli_score(tmp_path, gt, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "prediction": r["answer"]} for r in RECORDS])
    assert main(["score", "--pred", str(preds), "--gt", str(gt), "--json", "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total"]["closed"]["accuracy_strict"] == 100.0 and printed["total"]["open"]["recall"] == 100.0
    assert json.loads((tmp_path / "m.json").read_text())["total"] == printed["total"]
    assert main(["score", "--pred", str(preds), "--gt", str(gt)]) == 0
    text = capsys.readouterr().out
    assert "dataset=vqa-rad" in text and "open recall" in text
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert main(["score", "--pred", str(tmp_path / "bad.jsonl"), "--gt", str(gt)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.slow
def test_real_slake_english_test(tmp_path):
    from conftest import shared_data

    raw = json.loads(shared_data("slake", "test.json").read_text())
    english = [r for r in raw if r["q_lang"] == "en"]
    records = [{"id": f"slake-{r['qid']}", "image": r["img_name"], "question": r["question"], "answer": r["answer"],
                "answer_type": r["answer_type"], "modality": r["modality"], "dataset": "slake", "split": "test",
                "language": "en", "question_type": r["content_type"]} for r in english]
    gt = write_jsonl(tmp_path / "slake_test.jsonl", records)
    perfect = write_jsonl(tmp_path / "perfect.jsonl", [{"id": r["id"], "prediction": r["answer"]} for r in records])
    m, _ = score_files(perfect, gt)
    assert (m["total"]["closed"]["n"], m["total"]["open"]["n"]) == (416, 645)  # the usual benchmark split
    assert m["total"]["closed"]["accuracy"] == m["total"]["closed"]["accuracy_strict"] == 100.0
    assert m["total"]["open"]["recall"] == pytest.approx(100.0)
    always_yes = write_jsonl(tmp_path / "yes.jsonl", [{"id": r["id"], "prediction": "Yes"} for r in records])
    m, _ = score_files(always_yes, gt)
    closed = [r for r in records if r["answer_type"] == "CLOSED"]
    expected = 100 * sum(r["answer"].lower() in "yes" for r in closed) / len(closed)
    assert m["total"]["closed"]["accuracy"] == pytest.approx(expected)
    assert 0 < expected < 100


def test_official_numeric_ids_match_prepared_ids(tmp_path, capsys):
    """An official answer file (`question_id` 10) against a prepared split (`vqa-rad-10`)."""
    prepared = [{"id": f"vqa-rad-{q}", "image": "x.jpg", "question": "Is it normal?", "answer": a,
                 "answer_type": t, "dataset": "vqa-rad", "split": "test"}
                for q, a, t in [(10, "yes", "CLOSED"), (11, "no", "CLOSED"), (110, "liver", "OPEN")]]
    gt = write_jsonl(tmp_path / "test.jsonl", prepared)
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 10, "prompt": "x", "text": "Yes", "answer_id": "a", "model_id": "m"},
        {"question_id": 11, "text": "yes"}, {"question_id": 110, "text": "the liver"}, {"question_id": 7, "text": "no"}])
    m, rows = score_files(answers, gt)
    assert m["counts"]["missing"] == 0 and m["counts"]["extra_ids"] == ["7"]
    assert m["counts"]["mapped_official_ids"] == 3
    assert m["total"]["closed"]["accuracy"] == 50.0 and m["total"]["open"]["recall"] == 100.0
    assert {r["id"]: r["prediction"] for r in rows}["vqa-rad-110"] == "the liver"
    assert main(["score", "--pred", str(answers), "--gt", str(gt)]) == 0
    assert "3 numeric question ids" in capsys.readouterr().err
    # nothing matches at all: exit 2 with one line, not 0.0 scores
    other = write_jsonl(tmp_path / "other.jsonl", [{"question_id": 5, "text": "yes"}, {"id": "slake-1", "prediction": "no"}])
    with pytest.raises(DataError, match="none of its 2 prediction ids"):
        score_files(other, gt)
    assert main(["score", "--pred", str(other), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "none of its 2 prediction ids" in err and len(err.splitlines()) == 1


def test_ambiguous_or_our_own_numbers_are_not_guessed(tmp_path):
    """Two datasets share qid 3; PathVQA's prepared ids carry a line number, not the source's id."""
    mixed = [{"id": i, "question": "q", "answer": "yes", "answer_type": "CLOSED", "dataset": i.rsplit("-", 1)[0]}
             for i in ("vqa-rad-3", "slake-3", "slake-4")]
    mixed.append({"id": "pathvqa-test-5", "question": "q", "answer": "yes", "dataset": "pathvqa"})
    gt = write_jsonl(tmp_path / "gt.jsonl", mixed)
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": n, "text": "yes"} for n in (3, 4, 5)])
    m, _ = score_files(answers, gt)
    assert m["counts"]["mapped_official_ids"] == 1  # 4 -> slake-4 only
    assert m["counts"]["extra_ids"] == ["3", "5"]
    assert m["counts"]["missing_ids"] == ["vqa-rad-3", "slake-3", "pathvqa-test-5"]
