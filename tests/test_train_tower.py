"""The tower phase: image-level labels from the records, a tiny tower and its heads learning a
learnable toy problem, the held-out report, an atomic tower file that phase 1 loads, exact resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import one_thread

from medmoe.data.labels import image_labels
from medmoe.data.records import Record, write_records
from medmoe.errors import CheckpointError, ConfigError
from medmoe.evaluation.labels import family_scores, label_report, micro_f1
from medmoe.training.phases import finished, run_phase, starting_model
from medmoe.training.recipe import load_recipe
from medmoe.training.tower import TOWER_FILE, save_tower, target_matrix

COLOURS = {"CT": (200, 40, 40), "MRI": (40, 40, 200)}


def toy_records(folder, n: int = 48, seed: int = 0) -> str:
    """n images whose colour gives the modality (red CT, blue MRI) and brightness the organ."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        modality, organ = ("CT", "MRI")[i % 2], ("HEAD", "CHEST")[(i // 2) % 2]
        scale = 1.0 if organ == "HEAD" else 0.4
        pixels = np.clip(np.array(COLOURS[modality]) * scale + rng.normal(0, 20, (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
        records.append(Record(id=f"toy-{i}", image=f"{i}.png", question="What is this?", answer="x", modality=modality,
                              dataset="toy", meta={"organ": organ}))
    path = os.path.join(folder, "train.jsonl")
    write_records(path, records)
    return path


def test_image_labels_from_metadata(tmp_path):
    slake = tmp_path / "imgs"
    records = []
    for i in range(6):
        (slake / f"xmlab{i}").mkdir(parents=True)
        names = [{"Liver": [1, 2, 3, 4]}] + ([{"Spleen": [0, 0, 1, 1]}] if i < 3 else [])
        (slake / f"xmlab{i}" / "detection.json").write_text(json.dumps(names))
        image = str(slake / f"xmlab{i}" / "source.jpg")
        records += [Record(id=f"s{i}-{q}", image=image, question="q", answer="a", modality="CT", dataset="slake",
                           meta={"organ": "Abdomen" if i < 5 else "Lung"}) for q in range(2)]
    records += [Record(id=f"p{i}", image=f"/p/{i}.jpg", question="What does this image show?", answer="Brain",
                       modality="Pathology", dataset="pathvqa") for i in range(2)]
    labels = image_labels(records, min_count=2)
    assert len(labels.images) == 8  # one entry per image, not per question
    assert labels.classes["modality"] == ["CT", "Pathology"]
    assert labels.classes["structures"] == ["liver", "spleen"]
    assert labels.labels["structures"][0] == ["liver", "spleen"] and labels.labels["structures"][4] == ["liver"]
    assert "organ" not in labels.classes  # "lung" has one image, so only "abdomen" is left: no family
    assert "finding" not in labels.classes  # one class ("brain") only
    targets, layout = target_matrix(labels)
    assert targets.shape == (8, 1 + 2)
    assert targets[6, layout["structures"]].tolist() == [-100, -100]  # PathVQA images have no structures
    assert targets[6, layout["modality"]].tolist() == [1]
    with pytest.raises(ConfigError, match="family"):
        image_labels(records, families=["colour"])


def test_label_report_scores():
    single = {"truth": [0, 0, 0, 1], "pred": [0, 0, 1, 1], "classes": 2, "multi_label": False}
    scores = family_scores(single)
    assert scores["accuracy"] == 75.0 and scores["chance"] == 75.0
    assert scores["balanced_accuracy"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=0.01)
    assert scores["ci"][0] <= 75.0 <= scores["ci"][1]
    multi = {"truth": [[1, 0], [1, 1]], "pred": [[1, 0], [0, 1]], "classes": 2, "multi_label": True}
    assert label_report({"after": {"s": multi}})["after"]["s"]["micro_f1"] == 80.0  # 2 x 2 hits / (3 true + 2 predicted)
    assert micro_f1(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0


def tower_recipe(tmp_path, *extra):
    os.makedirs(tmp_path, exist_ok=True)
    data = toy_records(tmp_path)
    return load_recipe("tiny", [f"output_dir={tmp_path / 'run'}", "tower.enabled=true", f'tower.data=["{data}"]',
                                "tower.epochs=12", "tower.batch_size=8", "tower.lr=0.01", "tower.lr_groups={}",
                                "tower.min_count=2", "tower.log_every=1", "tower.heldout_fraction=0.25", "tower.probe_epochs=200",
                                *extra])


def test_tower_phase_learns_saves_and_phase1_loads_it(tmp_path):
    recipe = tower_recipe(tmp_path)
    with one_thread():
        result = run_phase(recipe, "tower")
    losses = [json.loads(line)["loss"] for line in open(os.path.join(result["dir"], "metrics.jsonl"))]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    report = label_report({k: result["predictions"][k] for k in ("before", "after")})
    assert report["after"]["modality"]["n"] == 12 and report["after"]["organ"]["n"] == 12
    for family in ("modality", "organ"):  # two balanced classes: chance is 50%
        assert report["after"][family]["accuracy"] >= 90.0
    saved = os.path.join(result["dir"], TOWER_FILE)
    assert os.path.isfile(saved) and not os.path.exists(saved + ".tmp")
    assert finished(recipe, "tower") is not None
    model, _ = starting_model(recipe, "1")
    tower = load_file(saved)
    assert all(torch.equal(v, tower[k]) for k, v in model.vision_tower.state_dict().items())
    plain = load_recipe("tiny", [f"output_dir={tmp_path / 'run'}"])
    assert run_phase(plain, "tower")["skipped"]  # off by default
    other, _ = starting_model(plain, "1")
    assert not torch.equal(other.vision_tower.patch.weight, tower["patch.weight"])


def test_tower_file_is_checked(tmp_path):
    recipe = load_recipe("tiny", [f"output_dir={tmp_path}", "tower.enabled=true"])
    with pytest.raises(CheckpointError, match="--phase tower"):
        starting_model(recipe, "1")
    wrong = torch.nn.Linear(2, 2)
    os.makedirs(tmp_path / "tower")
    save_tower(wrong, str(tmp_path / "tower" / TOWER_FILE))
    with pytest.raises(CheckpointError, match="vision tower"):
        starting_model(recipe, "1")


class Stop(Exception):
    pass


def test_tower_phase_resumes_exactly(tmp_path):
    extra = ["tower.epochs=3", "tower.save_every=2", "tower.keep_last=5"]

    def stop(step):
        if step == 5:
            raise Stop

    with one_thread():
        straight = run_phase(tower_recipe(tmp_path / "a", *extra), "tower")
        broken = tower_recipe(tmp_path / "b", *extra)
        with pytest.raises(Stop):
            run_phase(broken, "tower", on_step=stop)
        with pytest.raises(ConfigError, match="--resume"):
            run_phase(broken, "tower")
        resumed = run_phase(broken, "tower", resume=True)
    a = load_file(os.path.join(straight["dir"], TOWER_FILE))
    b = load_file(os.path.join(resumed["dir"], TOWER_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["predictions"]["after"] == resumed["predictions"]["after"]


def test_subset_prefers_images_with_more_labels():
    from medmoe.data.labels import ImageLabels
    from medmoe.training.tower import select_images

    images = [f"/x/{i}.png" for i in range(6)]
    labels = ImageLabels(images, {"modality": ["CT"] * 6, "organ": [None, "lung", None, "head", None, None]},
                         {"modality": ["CT", "MRI"], "organ": ["head", "lung"]})
    records = [Record(id=str(i), image=im, question="q", answer="a", dataset="a" if i < 4 else "b")
               for i, im in enumerate(images)]
    assert select_images(labels, records, 2, seed=0) == [1, 3, 4, 5]
    assert select_images(labels, records, 0, seed=0) == list(range(6))


def test_report_lines():
    from medmoe.evaluation.labels import format_label_report

    entry = {"truth": [0, 0, 0, 1], "pred": [0, 0, 1, 1], "classes": 2, "multi_label": False}
    report = label_report({"before": {"class": {**entry, "pred": [0, 0, 0, 0]}}, "after": {"class": entry}})
    (line,) = format_label_report(report)
    assert line.startswith("tower class: held-out accuracy 75.0 [") and "-> 75.0 [" in line and "constant guess 75.0" in line
    # Paired: the same images before and after; one image changed from right to wrong, one the reverse.
    assert report["change"]["class"]["points"] == 0.0 and ", change 0.0 [" in line
    many = {k: v * 10 if isinstance(v, list) else v for k, v in entry.items()}  # 40 images
    better = label_report({"before": {"class": {**many, "pred": [1] * 40}}, "after": {"class": many}})
    assert better["change"]["class"]["points"] == 50.0 and better["change"]["class"]["ci"][0] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_linear_probe_trains_on_the_features_device():
    """The probe's heads train where its features are (a GPU: thousands of tiny steps that a busy
    host ran at 0.2 s each) and predict what the same probe on the CPU predicts."""
    from medmoe.training.tower import linear_probe, predictions

    g = torch.Generator().manual_seed(0)
    classes, layout = {"modality": ["CT", "MRI"]}, {"modality": slice(0, 1)}
    targets = torch.randint(0, 2, (64, 1), generator=g).float()
    features = torch.randn(64, 16, generator=g) + 3 * targets
    heads = linear_probe(features.cuda(), targets, classes, layout, epochs=5, seed=0)
    assert next(heads.parameters()).device.type == "cuda"
    on_gpu = predictions(heads, features.cuda(), targets, classes, layout)
    on_cpu = predictions(linear_probe(features, targets, classes, layout, epochs=5, seed=0), features, targets,
                         classes, layout)
    agree = sum(a == b for a, b in zip(on_gpu["modality"]["pred"], on_cpu["modality"]["pred"]))
    assert agree >= 62 and on_gpu["modality"]["truth"] == on_cpu["modality"]["truth"]
