"""`medmoe compare`: paired differences between two evaluations, on hand-made runs whose answer is known."""

import json

import pytest

from medmoe.cli import main
from medmoe.errors import DataError
from medmoe.evaluation.compare import agreement, compare, compare_draws, compare_draws_text, compare_text

CLOSED = [(f"c{i}", "yes" if i % 2 else "no") for i in range(12)]
OPEN = [(f"o{i}", ["liver", "left lung", "brain"][i % 3]) for i in range(9)]
CLASSES = ["normal", "pneumonia"]
PNEUMONIA = [(f"p{i}", CLASSES[i % 3 == 0]) for i in range(12)]  # 4 pneumonia, 8 normal


def write_records(path, split="test"):
    rows = [{"id": i, "question": "q?", "answer": a, "answer_type": "CLOSED", "dataset": "toy", "split": split}
            for i, a in CLOSED]
    rows += [{"id": i, "question": "where?", "answer": a, "answer_type": "OPEN", "dataset": "toy", "split": split}
             for i, a in OPEN]
    rows += [{"id": i, "question": "normal or pneumonia?", "answer": a, "answer_type": "CLOSED", "choices": CLASSES,
              "dataset": "pneumonia", "split": split} for i, a in PNEUMONIA]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_eval(folder, data, answers: dict, split="test", shuffled=False, logprobs=None):
    """An eval output folder as `medmoe eval` writes it: predictions.jsonl, run.json, metrics.json."""
    folder.mkdir()
    rows = [{"id": i, "prediction": text, **({"choice_logprobs": logprobs[i]} if logprobs and i in logprobs else {})}
            for i, text in answers.items()]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "run.json").write_text(json.dumps({"model": "m", "data": str(data), "split": split,
                                                 "shuffle_images": shuffled}))
    run = {"model": "m", "data": str(data), "split": split, **({"images": "shuffled"} if shuffled else {})}
    (folder / "metrics.json").write_text(json.dumps({"run": run}))
    return folder


def right(ids_answers):
    return dict(ids_answers)


def wrong_closed():
    return {i: "no" if a == "yes" else "yes" for i, a in CLOSED}


@pytest.fixture
def records(tmp_path):
    return write_records(tmp_path / "toy.jsonl")


def by_metric(result):
    return {r["metric"]: r for r in result["rows"]}


def test_identical_runs_differ_by_nothing(tmp_path, records):
    answers = {**right(CLOSED), **{i: "liver" for i, _ in OPEN}, **right(PNEUMONIA)}
    a = write_eval(tmp_path / "a", records, answers)
    b = write_eval(tmp_path / "b", records, answers)
    result = compare(a, b)
    assert result["counts"] == {"compared": 33, "only_a": 0, "only_b": 0, "not_in_ground_truth": 0}
    for r in result["rows"]:
        assert r["difference"] == 0 and r["ci95"] == [0.0, 0.0] and r["verdict"] == "within noise", r
    rows = by_metric(result)
    assert rows["open recall"]["a"] == pytest.approx(100 / 3, abs=1e-4)  # "liver" is right on a third
    assert rows["pneumonia generate accuracy"]["a"] == 100.0  # no log-likelihoods: generation only
    assert "pneumonia loglik accuracy" not in rows


def test_b_right_where_a_is_wrong_is_b_better(tmp_path, records):
    a = write_eval(tmp_path / "a", records, {**wrong_closed(), **right(OPEN)})
    b = write_eval(tmp_path / "b", records, {**right(CLOSED), **right(OPEN)})
    result = compare(a, b)
    rows = by_metric(result)
    closed = rows["closed accuracy"]
    assert (closed["a"], closed["b"], closed["difference"]) == (0.0, 100.0, 100.0)
    assert closed["ci95"][0] > 0 and closed["verdict"] == "B better"
    assert rows["open recall"]["verdict"] == "within noise"
    assert rows["all (closed acc., open recall)"]["verdict"] == "B better"
    assert result["closed"] == {"both_right": 0, "only_a": 0, "only_b": 12, "both_wrong": 0,
                                "mcnemar_p": 0.000488}  # 2 / 2**12
    assert compare(b, a)["rows"][0]["verdict"] == "A better"  # the same runs, swapped


def test_mcnemar_counts_and_p_value():
    import numpy as np

    k = agreement(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 1, 0]))
    assert (k["both_right"], k["only_a"], k["only_b"], k["both_wrong"]) == (1, 2, 2, 0)
    assert k["mcnemar_p"] == 1.0  # an even split is no evidence
    assert agreement(np.zeros(10), np.ones(10))["mcnemar_p"] == 0.00195  # 2 / 2**10


def test_classification_balanced_accuracy_with_paired_intervals(tmp_path, records):
    """A always picks pneumonia; B gets every label right: B's balanced accuracy gain is beyond noise."""
    lean = {i: [-2.0, -0.1] for i, _ in PNEUMONIA}  # log-likelihoods of (normal, pneumonia)
    exact = {i: ([-0.1, -2.0] if a == "normal" else [-2.0, -0.1]) for i, a in PNEUMONIA}
    a = write_eval(tmp_path / "a", records, {i: "pneumonia" for i, _ in PNEUMONIA}, logprobs=lean)
    b = write_eval(tmp_path / "b", records, right(PNEUMONIA), logprobs=exact)
    rows = by_metric(compare(a, b))
    assert {m.split()[1] for m in rows} == {"loglik", "loglik_calibrated", "generate"}
    acc, balanced = rows["pneumonia loglik accuracy"], rows["pneumonia loglik balanced acc."]
    assert (acc["a"], acc["b"]) == (pytest.approx(100 / 3, abs=1e-4), 100.0)
    assert (balanced["a"], balanced["b"], balanced["difference"]) == (50.0, 100.0, 50.0)
    assert balanced["ci95"][0] > 0 and balanced["verdict"] == "B better"
    assert not [m for m in rows if m.startswith("closed")]  # no VQA question answered by both


def test_partial_overlap_compares_the_shared_questions_and_counts_the_rest(tmp_path, records):
    answers = {**right(CLOSED), **right(OPEN)}
    a = write_eval(tmp_path / "a", records, {i: t for i, t in answers.items() if i != "c0"} | {"zz": "x"})
    b = write_eval(tmp_path / "b", records, {i: t for i, t in answers.items() if i not in ("o0", "o1")})
    result = compare(a, b)
    assert result["counts"] == {"compared": 18, "only_a": 2, "only_b": 1, "not_in_ground_truth": 1}
    assert by_metric(result)["closed accuracy"]["n"] == 11
    assert "dropped: 2 answered only in A, 1 answered only in B, 1 not in the ground truth" in compare_text(result)


def test_runs_of_different_data_are_refused(tmp_path, records):
    other = write_records(tmp_path / "other.jsonl")
    a = write_eval(tmp_path / "a", records, right(CLOSED))
    b = write_eval(tmp_path / "b", other, right(CLOSED))
    with pytest.raises(DataError, match=r"toy\.jsonl \(split test\) but .*other\.jsonl.*--gt"):
        compare(a, b)
    assert compare(a, b, gt=str(records))["counts"]["compared"] == 12  # --gt: both scored against one file
    val = write_eval(tmp_path / "val", records, right(CLOSED), split="validation")
    with pytest.raises(DataError, match="split test.*split validation"):
        compare(a, val)
    records.unlink()  # the data moved since the evaluation
    with pytest.raises(DataError, match=r"toy\.jsonl: the data .*a/predictions\.jsonl was evaluated on is not there"):
        compare(a, a)


def test_no_shared_question_is_an_error(tmp_path, records):
    a = write_eval(tmp_path / "a", records, right(CLOSED))
    b = write_eval(tmp_path / "b", records, right(OPEN))
    with pytest.raises(DataError, match="no question of .*toy.jsonl .* answered in both"):
        compare(a, b)


def test_predictions_files_need_ground_truth(tmp_path, records):
    (tmp_path / "x").mkdir()
    pred = tmp_path / "x" / "answers.jsonl"
    pred.write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n" for i, a in CLOSED))
    with pytest.raises(DataError, match="pass --gt"):
        compare(pred, pred)
    folder = tmp_path / "prepared"
    folder.mkdir()
    write_records(folder / "test.jsonl")
    assert compare(pred, pred, gt=str(folder))["counts"]["compared"] == 12  # a prepared folder + split
    with pytest.raises(DataError, match="predictions.jsonl: not found"):
        compare(tmp_path / "x", pred)


def test_shuffled_images_control_against_the_same_model(tmp_path, records):
    a = write_eval(tmp_path / "asked", records, {**right(CLOSED), **right(OPEN)})
    b = write_eval(tmp_path / "shuffled", records, {**wrong_closed(), **{i: "kidney" for i, _ in OPEN}}, shuffled=True)
    result = compare(b, a)  # B - A: what the image adds
    assert result["a"]["images_shuffled"] and not result["b"]["images_shuffled"]
    assert by_metric(result)["open recall"]["verdict"] == "B better"
    assert "(model m, images shuffled)" in compare_text(result)


def test_cli_end_to_end(tmp_path, records, capsys):
    a = write_eval(tmp_path / "a", records, {**wrong_closed(), **right(OPEN)})
    b = write_eval(tmp_path / "b", records, {**right(CLOSED), **right(OPEN)})
    assert main(["compare", str(a), str(b / "predictions.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "closed accuracy" in text and "B better" in text and "only B right 12" in text
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["rows"][0]["verdict"] == "B better"
    other = write_eval(tmp_path / "c", write_records(tmp_path / "other.jsonl"), right(CLOSED))
    assert main(["compare", str(a), str(other)]) == 2
    assert "different questions" in capsys.readouterr().err


def half_right_closed():
    """The first six closed questions right, the other six wrong."""
    return {i: (a if n < 6 else ("no" if a == "yes" else "yes")) for n, (i, a) in enumerate(CLOSED)}


def test_one_draw_a_side_is_the_paired_comparison(tmp_path, records):
    """compare_draws with one draw a side gives compare's scores and differences, and the same
    balanced-accuracy interval (the same questions resampled)."""
    lean = {i: [-2.0, -0.1] for i, _ in PNEUMONIA}
    a = write_eval(tmp_path / "a", records, {**wrong_closed(), **right(OPEN), **{i: "pneumonia" for i, _ in PNEUMONIA}},
                   logprobs=lean)
    b = write_eval(tmp_path / "b", records, {**half_right_closed(), **{i: "liver" for i, _ in OPEN},
                                             **right(PNEUMONIA)})
    one, draws = by_metric(compare(a, b)), by_metric(compare_draws([a], [b]))
    assert set(draws) == set(one) - {"closed strict"}
    for metric, r in draws.items():
        assert (r["a"], r["b"], r["difference"]) == (one[metric]["a"], one[metric]["b"], one[metric]["difference"])
        assert r["a_draws"] == [r["a"]] and r["b_draws"] == [r["b"]]
    assert draws["pneumonia generate balanced acc."]["ci95"] == one["pneumonia generate balanced acc."]["ci95"]


def test_draws_are_averaged_and_their_spread_widens_the_interval(tmp_path, records):
    """B's two trainings disagree on every closed question (all right, then all wrong): B scores 50
    on every resample of the questions, yet that is no evidence against A's 0, since a third
    training could land anywhere between them. The interval resamples the draws too."""
    a1 = write_eval(tmp_path / "a1", records, wrong_closed())
    a2 = write_eval(tmp_path / "a2", records, wrong_closed())
    b1 = write_eval(tmp_path / "b1", records, right(CLOSED))
    b2 = write_eval(tmp_path / "b2", records, wrong_closed())
    result = compare_draws([a1, a2], [b1, b2])
    closed = by_metric(result)["closed accuracy"]
    assert (closed["a"], closed["b"], closed["a_draws"], closed["b_draws"]) == (0.0, 50.0, [0.0, 0.0], [100.0, 0.0])
    assert closed["ci95"] == [0.0, 100.0] and closed["verdict"] == "within noise"
    assert by_metric(compare_draws([a1], [b1]))["closed accuracy"]["verdict"] == "B better"
    assert result["counts"] == {"compared": 12, "not_in_every_draw": 0}
    text = compare_draws_text(result)
    assert "A, 2 draws:" in text and "100.00 / 0.00" in text


def test_draws_need_the_same_questions(tmp_path, records, capsys):
    a = write_eval(tmp_path / "a", records, right(CLOSED))
    other = write_records(tmp_path / "val.jsonl", split="validation")
    b = write_eval(tmp_path / "b", other, right(CLOSED), split="validation")
    with pytest.raises(DataError, match="different questions"):
        compare_draws([a, a], [b])
    assert main(["compare", str(a), str(a), str(a)]) == 2  # three runs without --vs: which are A and B?
    assert "--vs" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), "--vs", str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["b_draws"] == [100.0]
