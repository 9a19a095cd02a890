"""`medmoe data` end to end on generated files and (when present) the real datasets."""

import json
import os

import numpy as np

from conftest import shared_data
from medmoe.cli import main
from medmoe.data.records import load_split, read_records, sample_dataset_dir


def test_prepare_medmnist_and_captions_and_convert(tmp_path, capsys):
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.array([[0], [1], [1], [0]]),
             val_images=np.zeros((2, 28, 28), np.uint8), val_labels=np.array([[1], [0]]))
    out = tmp_path / "out"
    assert main(["data", "prepare", "medmnist", "--src", str(npz), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["total"] == 4 and summary["splits"]["validation"]["modality"] == {"X-Ray": 2}
    assert len(list((out / "images" / "train").glob("*.png"))) == 4
    assert main(["data", "captions", str(out)]) == 0
    assert len(read_records(out / "captions.jsonl")) == 4
    assert main(["data", "convert", str(out / "train.jsonl"), str(tmp_path / "train.json")]) == 0
    assert read_records(tmp_path / "train.json") == read_records(out / "train.jsonl")


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "prepare", "slake", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmoe data: error:") and "nope" in err


def test_prepare_sample_as_llava(tmp_path, capsys):
    llava = tmp_path / "sample.json"
    assert main(["data", "convert", str(sample_dataset_dir() / "train.jsonl"), str(llava)]) == 0
    assert main(["data", "prepare", "llava", "--src", str(llava), "--out", str(tmp_path / "o"), "--split", "dev",
                 "--image-root", str(sample_dataset_dir()), "--check-images"]) == 0
    assert "dev" in capsys.readouterr().out
    records = load_split(tmp_path / "o", "dev")
    assert len(records) == len(read_records(sample_dataset_dir() / "train.jsonl"))
    assert all(os.path.exists(r.image) for r in records)


def test_prepare_real_vqa_rad_prints_counts(tmp_path, capsys):
    src = shared_data("vqa-rad")
    assert main(["data", "prepare", "vqa-rad", "--src", str(src), "--out", str(tmp_path), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "451 QA" in out and "CLOSED 272, OPEN 179" in out and "(ok)" in out
    assert (tmp_path / "counts.png").stat().st_size > 1000


def test_check_images_names_the_bad_file(tmp_path, capsys):
    (tmp_path / "fake.png").write_text("not an image")
    llava = tmp_path / "train.json"
    llava.write_text(json.dumps([{"id": "s1", "image": "fake.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a CT"}]}]))
    args = ["data", "prepare", "llava", "--src", str(llava), "--out", str(tmp_path / "o")]
    assert main(args) == 0  # images are not opened unless asked
    assert main(args + ["--check-images"]) == 2
    assert "fake.png: not a readable image" in capsys.readouterr().err
