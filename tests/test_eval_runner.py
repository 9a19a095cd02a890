"""`medmoe eval` end to end with the tiny model: outputs, resume after interruption, routing."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import medmoe.evaluation.evaluate as ev
from medmoe.cli import main
from medmoe.engine.prefix_cache import image_digest
from medmoe.errors import DataError, ImageError
from medmoe.evaluation.evaluate import EvalSettings, evaluate


@pytest.fixture
def tiny_moe_dir(tmp_path, tiny):
    model, processor = tiny
    model.upcycle()
    path = tmp_path / "model"
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, (modality, q, a, t) in enumerate([("CT", "Is there a mass?", "no", "CLOSED"),
                                             ("MRI", "Which organ is shown?", "brain", "OPEN"),
                                             ("X-Ray", "Is the lung normal?", "yes", "CLOSED"),
                                             ("unknown", "Where is the lesion?", "left lobe", "OPEN"),
                                             ("CT", "How many kidneys?", "2", "OPEN")]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"id": f"q{i}", "image": f"imgs/{i}.png", "question": q, "answer": a, "answer_type": t,
                     "modality": modality, "dataset": "toy", "split": "test", "language": "en"})
    for i in range(3):  # a classification set
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB").save(tmp_path / "imgs" / f"c{i}.png")
        rows.append({"id": f"c{i}", "image": f"imgs/c{i}.png", "question": "Normal or pneumonia?",
                     "answer": ["normal", "pneumonia"][i % 2], "answer_type": "CLOSED", "modality": "X-Ray",
                     "dataset": "pneumonia", "split": "test", "choices": ["normal", "pneumonia"]})
    rows.append({"id": "t0", "image": "imgs/0.png", "question": "q", "answer": "a", "split": "train"})
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_eval_outputs(tmp_path, tiny_moe_dir, records, capsys):
    import gc

    out = tmp_path / "out"
    gc.unfreeze()
    try:
        code = main(["eval", "--model", str(tiny_moe_dir), "--data", str(records), "--out", str(out),
                     "--batch-size", "3", "--max-new-tokens", "4"])
        assert gc.get_freeze_count() > 0  # the CLI's process keeps its model: out of the collector's sight
    finally:
        gc.unfreeze()
    assert code == 0
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == ["c0", "c1", "c2", "q0", "q1", "q2", "q3", "q4"]  # no train row
    assert all(len(p["routing"]["image"]) == len(p["routing"]["text"]) for p in preds)
    assert len(preds[-1]["choice_logprobs"]) == 2
    assert all(0 < p["confidence"] <= 1 for p in preds if p["prediction"])  # every generated answer has one
    m = json.loads((out / "metrics.json").read_text())
    calib = m["calibration"]  # the answers' confidences against their scores, per question kind
    assert (calib["closed"]["n"], calib["open"]["n"]) == (2, 3) and calib["open"]["scored_by"] == "recall"
    assert 0 <= calib["closed"]["ece"] <= 100 and (out / "calibration_closed.png").stat().st_size > 0
    assert m["classification"]["pneumonia"]["loglik"]["calibration"]["n"] == 3
    assert m["vqa"]["counts"] == {**m["vqa"]["counts"], "ground_truth": 5, "missing": 0, "extra": 0}
    assert (m["vqa"]["total"]["closed"]["n"], m["vqa"]["total"]["open"]["n"]) == (2, 3)
    assert set(m["classification"]["pneumonia"]) == {"loglik", "loglik_calibrated", "loglik_contextual", "generate"}
    assert all(len(p["prior_logprobs"]) == 2 for p in preds if p["id"].startswith("c"))  # the question alone
    assert m["classification"]["pneumonia"]["loglik"]["n"] == 3
    acc = m["routing"]["router_accuracy"]
    assert acc["samples"] == 4 + 3  # every sample with a known modality; "unknown" is left out
    assert m["routing"]["layers"] and "--max-new-tokens 4" in m["run"]["command"]
    for name in ("report.md", "report.html", "routing.png", "confusion_pneumonia_loglik.png"):
        assert (out / name).stat().st_size > 0
    engine = m["run"]["engine"]  # what the engine did for this call
    assert engine["requests_finished"] == engine["first_tokens"] == 8 and engine["tokens_generated"] > 0
    assert engine["largest_batch"] == 3 and engine["graph_captures"] == 0
    printed = capsys.readouterr().out
    assert "router modality accuracy" in printed and "engine: 8 requests" in printed
    # scoring the same files with `medmoe score` gives the same VQA numbers
    vqa_gt = tmp_path / "vqa_gt.jsonl"
    vqa_gt.write_text("".join(l for l in records.read_text().splitlines(keepends=True) if '"q' in l[:10]))
    assert main(["score", "--pred", str(out / "predictions.jsonl"), "--gt", str(vqa_gt), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["total"] == m["vqa"]["total"]
    # the reference prefill (every prompt whole) gives the same answers and routing counts
    full = tmp_path / "full"
    assert main(["eval", "--model", str(tiny_moe_dir), "--data", str(records), "--out", str(full),
                 "--batch-size", "3", "--max-new-tokens", "4", "--no-share-prefix"]) == 0
    reference = [json.loads(l) for l in (full / "predictions.jsonl").read_text().splitlines()]
    assert [(p["id"], p["prediction"], p["routing"]) for p in reference] == [(p["id"], p["prediction"], p["routing"])
                                                                               for p in preds]
    assert [p.get("choice_logprobs") == pytest.approx(q.get("choice_logprobs"), abs=1e-4)
            if "choice_logprobs" in q else "choice_logprobs" not in p for p, q in zip(reference, preds)] == [True] * 8
    assert "--no-share-prefix" in json.loads((full / "metrics.json").read_text())["run"]["command"]


def test_resume_after_interruption(tmp_path, tiny, records, monkeypatch):
    model, processor = tiny
    settings = EvalSettings(model="tiny", data=str(records), out=str(tmp_path / "out"), batch_size=2,
                            max_new_tokens=3, routing=False)
    monkeypatch.setattr(ev, "CHUNK_BATCHES", 1)  # rows are appended per chunk of batches: one batch here
    real = ev.collect_batch
    seen = []

    def crash_after_two_batches(model, processor, items, handles, settings):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append([i.gt.id for i in items])
        return real(model, processor, items, handles, settings)

    monkeypatch.setattr(ev, "collect_batch", crash_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate(settings, model, processor)
    pred_path = tmp_path / "out" / "predictions.jsonl"
    first = pred_path.read_text().splitlines()
    assert len(first) == 4
    with open(pred_path, "a") as f:  # a torn line from a crash mid-write
        f.write('{"id": "q4", "predic')
    monkeypatch.setattr(ev, "collect_batch", real)
    redone = []
    submit = ev.submit_batch
    monkeypatch.setattr(ev, "submit_batch", lambda m, p, items, *args: redone.extend(i.gt.id for i in items)
                        or submit(m, p, items, *args))
    metrics = evaluate(settings, model, processor)
    assert sorted(redone) == ["c0", "c1", "c2", "q4"]  # finished items are not redone
    lines = pred_path.read_text().splitlines()
    assert lines[:4] == first and len(lines) == 8
    assert metrics["vqa"]["counts"]["missing"] == 0 and metrics["routing"] is None
    with pytest.raises(DataError, match="another run"):
        evaluate(EvalSettings(model="other", data=str(records), out=str(tmp_path / "out")), model, processor)


def test_split_errors(tmp_path, records):
    with pytest.raises(DataError, match="splits here"):
        ev.read_eval_items(records, "validation")
    assert len(ev.read_eval_items(records, "train")) == 1
    with pytest.raises(DataError, match="no such file"):
        ev.resolve_data_file(str(tmp_path / "nope"), "test")


@pytest.mark.slow
def test_real_vqa_rad_subset(tmp_path, tiny_moe_dir):
    from conftest import shared_data

    root = shared_data("vqa-rad")
    raw = json.loads((root / "VQA_RAD Dataset Public.json").read_text())
    test = [r for r in raw if r["phrase_type"] in ("test_freeform", "test_para")]
    assert len(test) == 451
    rows = [{"id": f"vqa-rad-{r['qid']}", "image": str(root / "VQA_RAD Image Folder" / r["image_name"]),
             "question": r["question"], "answer": str(r["answer"]), "answer_type": r["answer_type"],
             "modality": "unknown", "dataset": "vqa-rad", "split": "test", "question_type": r["question_type"]}
            for r in test[:6]]
    data = tmp_path / "vqa_rad_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_moe_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "4"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["vqa"]["counts"]["scored"] == 6 and m["vqa"]["counts"]["missing"] == 0
    assert set(m["vqa"]["by"]["question_type"]) == {r["question_type"].strip() for r in rows}
    assert m["routing"]["router_accuracy"]["samples"] == 0  # VQA-RAD has no modality field


def test_prepared_folder_with_image_root(tmp_path, records):
    prep = tmp_path / "prepared"
    prep.mkdir()
    rows = [json.loads(l) for l in records.read_text().splitlines()][:2]
    for r in rows:
        r["image"] = r["image"].removeprefix("imgs/")
    (prep / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (prep / "dataset.json").write_text(json.dumps({"image_root": "../imgs"}))
    path = ev.resolve_data_file(str(prep), "test")
    items = ev.read_eval_items(path, "test")
    assert [i.gt.id for i in items] == ["q0", "q1"]
    assert all(Image.open(i.image).size == (48, 40) for i in items)
    with pytest.raises(DataError, match="no validation.jsonl"):
        ev.resolve_data_file(str(prep), "validation")


def test_bundled_sample_resolves():
    path = ev.resolve_data_file("sample", "test")
    items = ev.read_eval_items(path, "test")
    assert path.name == "test.jsonl" and items and all(i.image is None or __import__("os").path.isfile(i.image) for i in items)


def test_resume_refuses_predictions_of_other_weights_under_the_same_name(tmp_path, tiny, records):
    model, processor = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    settings = EvalSettings(model=str(folder), data=str(records), out=str(tmp_path / "out"), batch_size=4,
                            max_new_tokens=2, routing=False)
    evaluate(settings, model, processor)
    evaluate(settings, model, processor)  # same weights: resumes (nothing to redo)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    del run["weights"]  # a folder written before weights were recorded still resumes
    (tmp_path / "out" / "run.json").write_text(json.dumps(run))
    evaluate(settings, model, processor)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(folder)  # retrained, saved under the same name
    with pytest.raises(DataError, match="weights"):
        evaluate(settings, model, processor)


def test_weights_fingerprint_sees_a_retrained_region_of_a_large_file(tmp_path):
    from medmoe.files import weights_fingerprint

    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, 16 << 20, dtype=np.uint8)  # 16 MiB: sampled, not read whole
    (tmp_path / "model.safetensors").write_bytes(data.tobytes())
    first = weights_fingerprint(tmp_path)
    assert first == weights_fingerprint(tmp_path) and weights_fingerprint(tmp_path / "nothing") is None
    data[7 << 20: 8 << 20] += 1  # one MiB in the middle changed, as training changes whole tensors
    (tmp_path / "model.safetensors").write_bytes(data.tobytes())
    assert weights_fingerprint(tmp_path) != first


def test_shuffled_images_control(tmp_path, records, tiny_moe_dir):
    items = ev.read_eval_items(records, "test")
    shuffled = ev.shuffle_images(items)
    assert [i.gt.id for i in shuffled] == [i.gt.id for i in items]  # same questions, same order
    assert all(a.image != b.image for a, b in zip(items, shuffled))  # no question keeps its image
    assert {i.image for i in shuffled} == {i.image for i in items}  # the same images, moved
    assert [i.image for i in ev.shuffle_images(items)] == [i.image for i in shuffled]  # fixed: a rerun resumes
    with pytest.raises(DataError, match="two different images"):
        ev.shuffle_images(items[:1])

    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_moe_dir), "--data", str(records), "--out", str(out), "--max-new-tokens", "2",
            "--limit", "2", "--no-routing"]
    assert main(args) == 0
    with pytest.raises(DataError, match="another run"):  # a control never mixes into a normal run's folder
        evaluate(EvalSettings(model=str(tiny_moe_dir), data=str(records), out=str(out), max_new_tokens=2, limit=2,
                              routing=False, shuffle_images=True))
    assert main(args[:6] + [str(tmp_path / "control")] + args[7:] + ["--shuffle-images"]) == 0
    run = json.loads((tmp_path / "control" / "metrics.json").read_text())["run"]
    assert "--shuffle-images" in run["command"] and "shuffled" in run["images"]


def test_encode_items_gives_encode_questions_prompts_with_each_image_read_once(tmp_path, tiny, records, monkeypatch):
    from medmoe.engine import encode_question

    _, processor = tiny
    items = ev.read_eval_items(records, "test") + ev.read_eval_items(records, "train")  # t0 asks about image 0 again
    items.append(ev.EvalItem(items[0].gt, None, None))  # and a text-only question
    reads = []
    real = processor.image_tensor
    monkeypatch.setattr(processor, "image_tensor", lambda image: reads.append(image) or real(image))
    prompts = ev.encode_items(processor, items)
    assert sorted(reads) == sorted({i.image for i in items if i.image}) and len(reads) == len(items) - 2
    ahead = ev.encode_items(processor, items, ev.read_images(processor, items))  # read ahead, as eval's chunks are
    assert [p.input_ids for p in ahead] == [p.input_ids for p in prompts]
    for item, prompt, early in zip(items, prompts, ahead):
        if prompt.pixel_values is not None:
            assert torch.equal(prompt.pixel_values, early.pixel_values)
            assert early.image_digests == prompt.image_digests == (image_digest(prompt.pixel_values[0]),)
    for item, prompt in zip(items, prompts):
        want = encode_question(processor, item.gt.question, item.image)
        assert prompt.input_ids == want.input_ids
        assert (prompt.pixel_values is None) == (want.pixel_values is None)
        if want.pixel_values is not None:
            assert torch.equal(prompt.pixel_values, want.pixel_values)


def test_a_placeholder_without_an_image_names_the_question(tiny, records):
    _, processor = tiny
    item = ev.read_eval_items(records, "test")[0]
    bad = ev.EvalItem(ev.replace(item.gt, question="<image> Is there a mass?"), None, None)
    with pytest.raises(DataError, match="question q0: 1 <image> placeholders for 0 image"):
        ev.encode_items(processor, [bad])


def test_a_broken_image_read_ahead_names_its_file_and_keeps_the_finished_chunks(tmp_path, tiny, records, monkeypatch):
    """The next chunk's images are read while this chunk is answered: a broken one stops the run
    with its file named, after the chunks before it were written (a resumed run keeps them)."""
    model, processor = tiny
    (tmp_path / "imgs" / "4.png").write_bytes(b"not a png")  # q4: in the third chunk of two
    monkeypatch.setattr(ev, "CHUNK_BATCHES", 1)
    settings = EvalSettings(model="tiny", data=str(records), out=str(tmp_path / "out"), batch_size=2,
                            max_new_tokens=2, routing=False)
    with pytest.raises(ImageError, match="4.png: not a readable image"):
        evaluate(settings, model, processor)
    kept = [json.loads(line)["id"] for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert kept == ["q0", "q1", "q2", "q3"]


def test_the_next_chunk_is_queued_before_this_ones_answers_are_collected(tmp_path, tiny, records, monkeypatch):
    """The engine's slots stay full across chunks: chunk k+1 is submitted before chunk k is
    collected; the first chunk is one batch."""
    model, processor = tiny
    order = []
    submit, collect = ev.submit_batch, ev.collect_batch
    monkeypatch.setattr(ev, "submit_batch", lambda m, p, items, *a: order.append(("submit", len(items)))
                        or submit(m, p, items, *a))
    monkeypatch.setattr(ev, "collect_batch", lambda m, p, items, *a: order.append(("collect", len(items)))
                        or collect(m, p, items, *a))
    monkeypatch.setattr(ev, "CHUNK_BATCHES", 2)
    settings = EvalSettings(model="tiny", data=str(records), out=str(tmp_path / "out"), batch_size=2,
                            max_new_tokens=2, routing=False)
    evaluate(settings, model, processor)
    assert order == [("submit", 2), ("submit", 4), ("collect", 2), ("submit", 2), ("collect", 4), ("collect", 2)]


def test_default_gpu_slots_fit_a_quarter_of_the_free_memory():
    """`medmoe eval` without --batch-size: 128 slots on a GPU where their KV cache fits, halved for a
    large model on a small card, never below 16; 8 on the CPU."""
    mib = 2**20
    assert ev.gpu_slots(9 * mib, 70 * 1024 * mib) == 128  # nano's 400-token slots on an H100
    assert ev.gpu_slots(230 * mib, 74 * 1024 * mib) == 64  # Phi-2-size 700-token slots: 14.4 of 18.5 GiB
    assert ev.gpu_slots(230 * mib, 18 * 1024 * mib) == 16  # ... on a 24 GB card: the floor
    model = type("CpuModel", (), {"device": torch.device("cpu")})()
    assert ev.default_batch_size(model, None, [], None) == ev.CPU_SLOTS
