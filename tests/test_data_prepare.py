"""Preparing datasets as shipped: real copies in ../shared/data (skipped when absent) and small
generated files for the quirks and bad inputs."""

import json

import numpy as np
import pytest

from conftest import shared_data
from medmoe.data.prepare import (check_known_sizes, derive_vqa_rad_modalities, prepare, prepare_medmnist, prepare_pathvqa,
                                 prepare_slake, prepare_vqa_rad, summarise, vqa_rad_modality_votes)
from medmoe.data.records import load_split
from medmoe.errors import DataError


def test_vqa_rad_real_split_sizes():
    splits = prepare_vqa_rad(shared_data("vqa-rad"))
    s = summarise(splits)
    assert s["train"]["total"] == 1797
    assert (s["test"]["total"], s["test"]["answer_type"]) == (451, {"CLOSED": 272, "OPEN": 179})
    assert {r.answer_type for rs in splits.values() for r in rs} == {"OPEN", "CLOSED"}  # "CLOSED " normalised
    assert all(r.image.startswith("VQA_RAD Image Folder/") for r in splits["test"])
    assert 0.2 < s["test"]["modality_coverage"]["images"] < 0.6
    assert check_known_sizes("vqa-rad", s)


def test_slake_real_english_and_chinese():
    s = summarise(prepare_slake(shared_data("slake")))
    assert (s["test"]["total"], s["test"]["answer_type"]) == (1061, {"CLOSED": 416, "OPEN": 645})
    assert s["train"]["total"] == 4919 and s["validation"]["total"] == 1053
    assert s["test"]["modality_coverage"]["qa"] == 1.0
    zh = prepare_slake(shared_data("slake"), lang="zh")
    assert {r.language for r in zh["test"]} == {"zh"} and len(zh["test"]) == 1033
    assert len(prepare_slake(shared_data("slake"), lang="all")["train"]) == 9835


def test_pathvqa_real():
    splits = prepare_pathvqa(shared_data("pathvqa"))
    train = splits["train"]
    assert len(train) == 19654 and {r.modality for r in train} == {"Pathology"}
    assert all((r.answer_type == "CLOSED") == (r.answer.lower() in ("yes", "no")) for r in train)


def test_medmnist_real_writes_pngs(tmp_path):
    info = prepare("medmnist", shared_data("pneumoniamnist", "pneumoniamnist.npz"), tmp_path)
    assert info["image_root"] == "."
    assert {k: v["total"] for k, v in info["splits"].items()} == {"train": 3882, "validation": 524}
    r = load_split(tmp_path, "validation")[0]
    assert r.choices == ["normal", "pneumonia"] and r.answer in r.choices and "normal, pneumonia" in r.question
    from PIL import Image
    assert Image.open(r.image).size == (28, 28)


def test_vqa_rad_modality_rules():
    assert vqa_rad_modality_votes("What type of imaging is this?", "MRI Diffusion Weighted") == {"MRI"}
    assert vqa_rad_modality_votes("Is this a CT scan?", "yes") == {"CT"}
    assert vqa_rad_modality_votes("Is this a CT scan?", "no") == set()
    assert vqa_rad_modality_votes("What type of imaging does this not represent?", "x-ray") == set()
    assert vqa_rad_modality_votes("How was this image taken?", "Plain film x-ray") == {"X-Ray"}
    assert vqa_rad_modality_votes("What kind of image?", "ultrasound") == set()
    rows = [dict(image_name="a", question_type="MODALITY", question="Is this an MRI?", answer="yes"),
            dict(image_name="a", question_type="PRES", question="Is this a CT?", answer="yes"),  # not a MODALITY question
            dict(image_name="b", question_type="MODALITY", question="Is this a CT?", answer="yes"),
            dict(image_name="b", question_type="MODALITY", question="What modality?", answer="MRI")]  # tie: unknown
    assert derive_vqa_rad_modalities(rows) == {"a": "MRI"}


def write_vqa_rad(folder, test_closed=272, test_open=179):
    rows = []
    for i, (phrase, kind) in enumerate([("freeform", "OPEN"), ("para", "CLOSED ")] + [("test_freeform", "CLOSED ")] * test_closed
                                       + [("test_para", "OPEN")] * test_open):
        rows.append(dict(qid=str(i), phrase_type=phrase, image_name="synpic1.jpg", image_organ="HEAD", question_type="MODALITY",
                         question="Is this a CT?", answer="yes" if "CLOSED" in kind else "brain", answer_type=kind))
    (folder / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))


def test_prepare_writes_splits_and_checks_sizes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_vqa_rad(src)
    info = prepare("vqa-rad", src, tmp_path / "out")
    assert info["checks"] and (tmp_path / "out" / "dataset.json").exists()
    test = load_split(tmp_path / "out", "test")
    assert len(test) == 451 and test[0].image == str(src / "VQA_RAD Image Folder" / "synpic1.jpg")
    assert test[0].modality == "CT"
    write_vqa_rad(src, test_closed=271)
    with pytest.raises(DataError, match="published split"):
        prepare("vqa-rad", src, tmp_path / "out2")
    assert prepare("vqa-rad", src, tmp_path / "out2", check_sizes=False)["splits"]["test"]["total"] == 450


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare("slake", tmp_path / "missing", tmp_path / "out")
    with pytest.raises(DataError, match="no SLAKE split files"):
        prepare_slake(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"image": "a.jpg", "question": "q"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:1"):
        prepare_pathvqa(tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        prepare("mimic", tmp_path, tmp_path / "out")


def test_medmnist_generated_and_unknown(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "organcmnist.npz"
    np.savez(path, train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8), train_labels=np.array([[0], [3], [10], [1], [2]]),
             test_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8), test_labels=np.array([[6], [6]]))
    splits = prepare_medmnist(path)
    assert [r.answer for r in splits["train"]][:3] == ["bladder", "heart", "spleen"]
    assert splits["test"][0].modality == "CT" and splits["test"][0].answer == "liver"
    odd = tmp_path / "mystery.npz"
    np.savez(odd, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([[0], [1]]))
    with pytest.raises(DataError, match="--labels"):
        prepare_medmnist(odd)
    assert prepare_medmnist(odd, labels=["cat", "dog"])["train"][1].answer == "dog"
    with pytest.raises(DataError, match="label names"):
        prepare_medmnist(odd, labels=["cat"])


def test_holdout_splits_by_image_and_is_stable(tmp_path):
    from medmoe.data.prepare import hold_out
    from medmoe.data.records import Record

    records = [Record(id=f"q{i}", image=f"img{i % 50}.jpg", question="q", answer="yes", answer_type="CLOSED",
                      modality="Pathology", dataset="pathvqa", split="train", language="en") for i in range(500)]
    splits = hold_out({"train": list(records)}, 0.2, seed=0)
    train_images = {r.image for r in splits["train"]}
    held_images = {r.image for r in splits["heldout"]}
    assert not train_images & held_images  # no image on both sides
    assert 0 < len(held_images) < 50 and len(splits["train"]) + len(splits["heldout"]) == 500
    again = hold_out({"train": list(reversed(records))}, 0.2, seed=0)
    assert {r.image for r in again["heldout"]} == held_images  # order does not matter


def test_vqa_rad_training_modality_ignores_test_answers(tmp_path):
    """An image whose only MODALITY question is a test question gets no modality in training
    (captions, router and tower labels read it), but keeps it on the test records for the report."""
    rows = [dict(qid="1", phrase_type="freeform", image_name="a.jpg", image_organ="HEAD", question_type="SIZE",
                 question="Is it big?", answer="yes", answer_type="CLOSED"),
            dict(qid="2", phrase_type="test_freeform", image_name="a.jpg", image_organ="HEAD", question_type="MODALITY",
                 question="Is this a CT?", answer="yes", answer_type="CLOSED"),
            dict(qid="3", phrase_type="para", image_name="b.jpg", image_organ="CHEST", question_type="MODALITY",
                 question="What modality is this?", answer="x-ray", answer_type="OPEN")]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    splits = prepare_vqa_rad(tmp_path)
    train = {r.image.rsplit("/", 1)[-1]: r.modality for r in splits["train"]}
    assert train == {"a.jpg": "unknown", "b.jpg": "X-Ray"}
    assert splits["test"][0].modality == "CT"
