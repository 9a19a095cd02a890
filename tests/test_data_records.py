"""Canonical records and the LLaVA conversation format."""

import json

import pytest

from medmoe.data.records import (Record, from_llava, image_root, load_split, read_records, sample_dataset_dir, to_llava,
                                 write_llava, write_records)
from medmoe.errors import DataError


def make(i=0, **kw):
    base = dict(id=f"r{i}", image=f"img/{i}.png", question="Is this a CT?", answer="yes", answer_type="CLOSED ",
                modality="CT", dataset="toy", split="train")
    base.update(kw)
    return Record(**base)


def test_answer_type_is_normalised_or_inferred():
    assert make(answer_type="CLOSED ").answer_type == "CLOSED"
    assert make(answer_type="", answer="No").answer_type == "CLOSED"
    assert make(answer_type=None, answer="left lung").answer_type == "OPEN"
    assert make(modality="Ultrasound").modality == "unknown"
    assert [make(modality=m).modality for m in ("x-ray", "XRAY", "ct", "pathology")] == ["X-Ray", "X-Ray", "CT", "Pathology"]


def test_jsonl_round_trip_is_lossless(tmp_path):
    records = [make(0), make(1, turns=[["And the organ?", "liver"]], choices=["a", "b"], meta={"organ": "ABD"})]
    path = tmp_path / "train.jsonl"
    assert write_records(path, records) == 2
    assert read_records(path) == records
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"id", "image", "question", "answer", "answer_type", "modality", "dataset", "split", "language"}


def test_llava_round_trip(tmp_path):
    records = [make(0, turns=[["Which organ?", "liver"]]), make(1, image=None, question="What is MRI?", answer="a scan")]
    path = tmp_path / "train.json"
    write_llava(path, records)
    data = json.loads(path.read_text())
    assert data[0]["conversations"][0] == {"from": "human", "value": "<image>\nIs this a CT?"}
    assert data[0]["conversations"][1] == {"from": "gpt", "value": "yes"}
    assert "image" not in data[1]
    assert read_records(path) == records


def test_plain_llava_sample_without_extra_keys():
    r = from_llava({"id": 7, "image": "a.jpg", "conversations": [{"from": "human", "value": "What is shown?\n<image>"},
                                                              {"from": "gpt", "value": "Yes"}]})
    assert (r.id, r.question, r.answer, r.answer_type, r.modality) == ("7", "What is shown?", "Yes", "CLOSED", "unknown")
    assert to_llava(r)["conversations"][0]["value"] == "<image>\nWhat is shown?"


def test_bad_inputs_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_records(bad)
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"id": 1, "question": "q"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1.*answer"):
        read_records(missing)
    llava = tmp_path / "l.json"
    llava.write_text('[{"id": 1, "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]')
    with pytest.raises(DataError, match=r"human then gpt"):
        read_records(llava)


def test_image_root_from_dataset_json(tmp_path):
    write_records(tmp_path / "test.jsonl", [make(0)])
    assert load_split(tmp_path, "test")[0].image == str(tmp_path.resolve() / "img/0.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"image_root": "/data/raw"}))
    assert image_root(tmp_path).as_posix() == "/data/raw"
    assert load_split(tmp_path, "test")[0].image == "/data/raw/img/0.png"
    with pytest.raises(DataError, match="no such split"):
        load_split(tmp_path, "validation")


def test_bundled_sample_dataset():
    folder = sample_dataset_dir()
    train, test = load_split(folder, "train"), load_split(folder, "test")
    assert 30 <= len(train) <= 60 and 10 <= len(test) <= 25
    records = train + test
    assert {r.modality for r in records} == {"CT", "MRI", "X-Ray"}
    assert {r.answer_type for r in records} == {"OPEN", "CLOSED"}
    images = {r.image for r in records}
    assert len(images) == 12
    assert sum((folder / "images" / p.split("/")[-1]).stat().st_size for p in images) < 500_000
    assert (folder / "LICENSE.md").read_text().count("CC0") >= 1
