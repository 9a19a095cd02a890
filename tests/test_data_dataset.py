"""Torch dataset, collate, samplers, mixtures and the tokenisation-mismatch check."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from medmoe.data.dataset import (Collate, LengthGroupedBatchSampler, MixtureDataset, SeededSampler, TokenizationMismatch,
                                 VQADataset, record_turns)
from medmoe.data.processor import MedMoEProcessor
from medmoe.data.records import Record, load_split, sample_dataset_dir
from medmoe.data.templates import IGNORE_INDEX


@pytest.fixture
def processor(tiny):
    return tiny[1]


def sample_records():
    return load_split(sample_dataset_dir(), "train")


def test_example_has_labels_on_answer_only(processor):
    ds = VQADataset(sample_records(), processor)
    record, item = ds.records[0], ds[0]
    assert item["id"] == record.id and item["modality"] == record.modality
    s = processor.vision.image_size
    assert item["pixel_values"].shape == (1, 3, s, s)
    ids, labels = item["input_ids"], item["labels"]
    assert ids.count(processor.image_token_id) == processor.num_image_tokens
    answer = [l for l in labels if l != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer) == f" {record.answer}{processor.tokenizer.eos_token}"
    assert all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == processor.image_token_id)


def test_plain_template_for_captions(processor):
    r = Record(id="c1", image=sample_records()[0].image, question="", answer="CT scan of the abdomen.")
    assert record_turns(r, "plain")[0].question == "<image>"
    item = VQADataset([r], processor, template="plain")[0]
    n = processor.num_image_tokens
    assert item["input_ids"][:n] == [processor.image_token_id] * n
    assert processor.tokenizer.decode(item["input_ids"][n:]) == "CT scan of the abdomen.\n"
    assert item["labels"][:n] == [IGNORE_INDEX] * n and item["labels"][n:] == item["input_ids"][n:]


def test_collate_pads_dynamically_and_keeps_image_order(processor):
    records = sample_records()[:3] + [Record(id="t", image=None, question="What is a CT?", answer="a scan")]
    ds = VQADataset(records, processor)
    batch = Collate(processor)([ds[i] for i in (3, 0, 2)])
    longest = max(len(ds[i]["input_ids"]) for i in (3, 0, 2))
    assert batch["input_ids"].shape == (3, longest) and batch["labels"].shape == (3, longest)
    assert batch["ids"] == ["t", records[0].id, records[2].id]
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][1], ds[2]["pixel_values"][0])
    assert int(batch["attention_mask"][0].sum()) == len(ds[3]["input_ids"])
    assert Collate(processor)([ds[3]])["pixel_values"] is None


def test_batch_runs_through_the_model(tiny):
    model, processor = tiny
    ds = VQADataset(sample_records()[:4], processor)
    batch = Collate(processor)([ds[i] for i in range(4)])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                pixel_values=batch["pixel_values"])
    assert torch.isfinite(out.loss)


def test_max_length_truncates_text_but_never_image_tokens(processor):
    full = VQADataset(sample_records()[:1], processor)[0]["input_ids"]
    last_image = max(i for i, t in enumerate(full) if t == processor.image_token_id)
    ds = VQADataset(sample_records()[:1], processor, max_length=last_image + 5)
    assert ds[0]["input_ids"] == full[:last_image + 5]
    with pytest.raises(Exception, match="would cut image tokens"):
        VQADataset(sample_records()[:1], processor, max_length=last_image)[0]


def merging_tokenizer():
    """A byte tokenizer with one merge, ':' + ' ' -> ':Ġ', so 'ASSISTANT:' | ' yes' tokenised in two
    segments differs from the full text: the mismatch LLaVA silently drops."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[":Ġ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "Ġ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>")
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<pad>"})
    return tok


def test_tokenization_mismatch_is_an_error_naming_the_sample(processor, capsys):
    proc = MedMoEProcessor(merging_tokenizer(), processor.vision, template="medmoe")
    records = [Record(id="vqa-rad-17", image=None, question="Is this a CT?", answer="yes"),
               Record(id="vqa-rad-18", image=None, question="Is it?", answer="no")]
    with pytest.raises(TokenizationMismatch, match="sample vqa-rad-17: tokenization mismatch"):
        VQADataset(records, proc)[0]
    allowed = VQADataset(records, proc, allow_mismatch=True)
    assert allowed.check() == ["vqa-rad-17", "vqa-rad-18"]
    allowed[0]  # printed once per sample, not per access
    err = capsys.readouterr().err
    assert err.count("vqa-rad-17") == 1 and "vqa-rad-18" in err
    labels = [l for l in allowed[0]["labels"] if l != IGNORE_INDEX]
    assert proc.tokenizer.decode(labels) == " yes<|endoftext|>"  # kept sample still trains on its answer only


def test_no_mismatch_with_aligned_tokenizer(processor):
    ds = VQADataset(sample_records(), processor)
    assert ds.check() == []


def test_seeded_sampler_is_deterministic():
    a, b = SeededSampler(50, seed=3), SeededSampler(50, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(SeededSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(200)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, group=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, group=5))
    assert batches != list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, group=5))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    random_batches = [list(range(200))[i:i + 8] for i in range(0, 200, 8)]
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_batches)
    assert spread < random_spread / 3
    assert all(len(b) == 8 for b in LengthGroupedBatchSampler(lengths[:20], 8, drop_last=True))


def test_mixture_follows_weights_and_seed():
    a, b = list(range(100)), list(range(1000, 1010))
    mix = MixtureDataset({"big": a, "small": b}, weights={"big": 1, "small": 1}, size=60, seed=0)
    items = [mix[i] for i in range(len(mix))]
    assert len(items) == 60
    small = [x for x in items if x >= 1000]
    assert len(small) == 30 and set(small) == set(b)  # oversampled: every example, then repeats
    big = [x for x in items if x < 1000]
    assert len(set(big)) == 30  # undersampled: a subset without repeats
    again = MixtureDataset({"big": a, "small": b}, weights={"big": 1, "small": 1}, size=60, seed=0)
    assert [again[i] for i in range(60)] == items
    mix.set_epoch(1)
    assert [mix[i] for i in range(60)] != items
    assert mix.source(0) in ("big", "small")
    assert len(MixtureDataset([a, b])) == 110
    with pytest.raises(Exception, match="weights"):
        MixtureDataset([a, b], weights=[1])


def test_augmented_dataset_shows_another_view_each_time(processor):
    records = sample_records()[:1]
    plain = VQADataset(records, processor)
    augmented = VQADataset(records, processor, augment_images=True)
    assert torch.equal(plain[0]["pixel_values"], plain[0]["pixel_values"])
    first, second = augmented[0]["pixel_values"], augmented[0]["pixel_values"]
    assert first.shape == plain[0]["pixel_values"].shape and not torch.equal(first, second)
    assert augmented[0]["input_ids"] == plain[0]["input_ids"]  # the text is untouched
