"""Phase-1 captions from dataset metadata."""

import json

from conftest import shared_data
from medmoe.data.captions import build_captions, caption, detected_structures
from medmoe.data.prepare import prepare_slake
from medmoe.data.records import Record


def rec(image="a.jpg", **kw):
    base = dict(id="r", image=image, question="q", answer="a", modality="CT", dataset="vqa-rad", meta={"organ": "ABD"})
    base.update(kw)
    return Record(**base)


def test_caption_uses_modality_organ_and_structures():
    text = caption(rec(), ["liver", "spleen"])
    assert "CT scan of the abdomen showing liver and spleen." in text
    assert caption(rec(modality="MRI")).startswith(("This is an MRI", "MRI", "An MRI"))
    assert "X-ray" in caption(rec(modality="X-Ray", meta={}))


def test_one_caption_per_image_and_pathvqa_facts():
    records = [rec("p.jpg", dataset="pathvqa", modality="Pathology", meta={}, question="what does this image show?",
                   answer="foci of fat necrosis"),
               rec("p.jpg", dataset="pathvqa", modality="Pathology", meta={}, question="where is this?", answer="pancreas"),
               rec("p.jpg", dataset="pathvqa", modality="Pathology", meta={}, question="is this fat?", answer="yes"),
               rec("b.jpg"), rec(None)]
    caps = build_captions(records)
    assert [c.image for c in caps] == ["p.jpg", "b.jpg"]
    assert "pathology image of the pancreas showing foci of fat necrosis." in caps[0].answer.lower()
    assert caps[0].question == "" and caps[0].split == "captions" and caps[0].modality == "Pathology"
    assert build_captions(records, seed=0) == build_captions(records, seed=0)


def test_detection_json(tmp_path):
    path = tmp_path / "detection.json"
    path.write_text(json.dumps([{"Liver": [1, 2, 3, 4]}, {"Left Kidney": [0, 0, 1, 1]}, {"Liver": [5, 5, 1, 1]}]))
    assert detected_structures(path) == ["liver", "left kidney"]
    assert detected_structures(tmp_path / "missing.json") == []


def test_slake_real_captions_name_structures():
    src = shared_data("slake")
    caps = build_captions(prepare_slake(src)["train"], src)
    assert len(caps) == 450
    assert sum("showing" in c.answer for c in caps) > 300
    assert {c.modality for c in caps} == {"CT", "MRI", "X-Ray"}
