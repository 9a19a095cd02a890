"""Closed yes/no questions from image-level labels (data/label_questions.py, the
`label-questions:<source>` data source): one yes and one no per image and labelled family, the no
a class the image does not have, seeded, balanced so that the question alone cannot answer."""

import json
from collections import Counter

from medmoe.data.label_questions import label_questions
from medmoe.data.records import Record
from medmoe.training.data import load_records


def rec(image, modality="CT", organ="ABD", dataset="vqa-rad"):
    return Record(id=image, image=image, question="q", answer="a", modality=modality, dataset=dataset,
                  meta={"organ": organ})


def images(n=12):
    kinds = [("CT", "ABD"), ("MRI", "HEAD"), ("X-Ray", "CHEST")]
    return [rec(f"/i/{k}.jpg", *kinds[k % 3]) for k in range(n)] + [rec("/i/0.jpg")]  # image 0 asked twice


def test_one_yes_and_one_no_per_image_and_family_and_the_no_is_another_class():
    records = images()
    questions = label_questions(records, min_count=2)
    assert len(questions) == 12 * 2 * 2  # 12 distinct images, modality and organ, yes and no
    assert Counter(q.answer for q in questions) == {"yes": 24, "no": 24}
    truth = {r.image: r for r in records}
    for q in questions:
        r = truth[q.image]
        own = {"modality": {"CT": "a CT scan", "MRI": "an MRI", "X-Ray": "an x-ray"}[r.modality],
               "organ": {"ABD": "abdomen", "HEAD": "head", "CHEST": "chest"}[r.meta["organ"]]}[q.meta["question_type"]]
        assert (own in q.question) == (q.answer == "yes"), q
        assert q.answer_type == "CLOSED" and q.modality == r.modality and q.dataset == "vqa-rad-label-questions"
    # Each question is asked with yes about some images and with no about others.
    answers = {}
    for q in questions:
        answers.setdefault(q.question, set()).add(q.answer)
    assert all(a == {"yes", "no"} for a in answers.values())
    assert label_questions(records, min_count=2, seed=3) == label_questions(records, min_count=2, seed=3)
    assert label_questions(records, min_count=2, seed=3) != label_questions(records, min_count=2, seed=4)


def test_unlabelled_images_and_single_class_families_give_no_questions():
    assert label_questions([rec("/i/a.jpg", modality="unknown", organ="")]) == []
    same = [rec(f"/i/{k}.jpg") for k in range(6)]  # one modality, one organ: no class to say no with
    assert label_questions(same, min_count=1) == []


def test_slake_structures_ask_whether_the_picture_contains_them(tmp_path):
    records = []
    for k in range(6):
        folder = tmp_path / f"xmlab{k}"
        folder.mkdir()
        names = ["Liver", "Spleen"] if k % 2 else ["Brain", "Eyes"]
        (folder / "detection.json").write_text(json.dumps([{n: [0, 0, 1, 1]} for n in names]))
        records.append(rec(str(folder / "source.jpg"), dataset="slake", organ="Abdomen" if k % 2 else "Brain"))
    questions = [q for q in label_questions(records, min_count=2) if q.meta["question_type"] == "structures"]
    assert len(questions) == 12
    for q in questions:
        contained = ["liver", "spleen"] if int(q.image.split("xmlab")[1][0]) % 2 else ["brain", "eyes"]
        name = q.question.removeprefix("Does the picture contain ").removesuffix("?")
        assert (name in contained) == (q.answer == "yes")


def prepared_folder(tmp_path, split: str, n: int = 10):
    """A prepared VQA-RAD-like folder: n images of the split, CT of the abdomen or MRI of the head."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [dict(id=str(k), image=f"{k}.jpg", question="q?", answer="yes", modality=["CT", "MRI"][k % 2],
                 dataset="vqa-rad", split=split, meta={"organ": ["ABD", "HEAD"][k % 2]}) for k in range(n)]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "dataset.json").write_text(json.dumps({"name": "vqa-rad", "splits": [split]}))
    return folder


def test_the_data_source_builds_them_from_a_prepared_folder(tmp_path):
    folder = prepared_folder(tmp_path, "train")
    questions = load_records([f"label-questions:{folder}"])
    assert len(questions) == 10 * 2 * 2 and {q.split for q in questions} == {"train"}


def test_the_data_command_writes_them_for_evaluation(tmp_path, capsys):
    from medmoe.cli import main
    from medmoe.data.records import read_records

    folder = prepared_folder(tmp_path, "test")
    assert main(["data", "label-questions", str(folder)]) == 0
    written = read_records(folder / "label-questions-test.jsonl")
    assert len(written) == 40 and {r.split for r in written} == {"test"}
    assert "medmoe eval --data" in capsys.readouterr().out
