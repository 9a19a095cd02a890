"""Router training: 100% on separable toy features, deterministic label order, held-out split,
per-layer routers on real FFN inputs, weights loaded into an upcycled model."""

from __future__ import annotations

import json

import torch
from train_helpers import one_thread

from medmoe.config import MODALITIES
from medmoe.training.recipe import RouterRecipe
from medmoe.training.router import (ROUTER_FILE, heldout_split, labelled, load_router_weights, pooled_features,
                                    run_router_phase, train_router)


def test_router_reaches_100_percent_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 3
    y = torch.arange(200) % 4
    x = centres[y] + 0.3 * torch.randn(200, 32, generator=g)
    head, metrics = train_router(x, y, epochs=10, lr=1e-2, heldout_fraction=0.2)
    assert metrics["heldout_accuracy"] == 1.0 and metrics["train_accuracy"] == 1.0
    assert metrics["heldout_n"] == 40 and metrics["train_n"] == 160
    assert metrics["label_order"] == list(MODALITIES)
    again, _ = train_router(x, y, epochs=10, lr=1e-2, heldout_fraction=0.2)
    assert torch.equal(head.weight, again.weight)  # deterministic


def test_labels_follow_the_fixed_modality_order():
    records = [{"modality": m} for m in ("Pathology", "CT", "unknown", "X-Ray", "MRI")]
    kept, y = labelled(records)
    assert y.tolist() == [3, 0, 2, 1]
    assert len(kept) == 4
    train_idx, held_idx = heldout_split(10, 0.3, seed=0)
    assert len(held_idx) == 3 and sorted(train_idx.tolist() + held_idx.tolist()) == list(range(10))


def test_router_phase_on_a_tiny_model_writes_shared_and_per_layer_routers(tiny, tmp_path):
    model, processor = tiny
    g = torch.Generator().manual_seed(0)
    from PIL import Image

    records = []
    for i in range(12):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        records.append({"id": str(i), "image": Image.fromarray(pixels), "question": "what?", "answer": "a",
                        "modality": MODALITIES[i % 4]})
    processor.system = ""  # short prompts
    cfg = RouterRecipe(epochs=2, train_per_layer=True, heldout_fraction=0.25)
    with one_thread():
        metrics = run_router_phase(model, processor, records, cfg, str(tmp_path), moe_layers=[0, 2], seed=0)
    assert set(metrics["per_layer"]) == {0, 2}
    assert metrics["heldout_n"] == 3
    assert json.load(open(tmp_path / "router_metrics.json"))["label_order"] == list(MODALITIES)
    assert (tmp_path / "router_features.safetensors").exists()

    shared = model.upcycle()
    load_router_weights(shared, str(tmp_path / ROUTER_FILE))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / ROUTER_FILE))
    assert torch.equal(shared.router.weight, saved["weight"])
    assert saved["layers.2.weight"].shape == shared.router.weight.shape


def test_per_layer_router_weights_go_to_each_block(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny
    model.upcycle({"router_sharing": "per_layer"})
    d = model.config.hidden_size
    tensors = {"weight": torch.zeros(4, d), "bias": torch.zeros(4)}
    for block in model.moe_blocks:
        tensors[f"layers.{block.layer_idx}.weight"] = torch.full((4, d), float(block.layer_idx))
        tensors[f"layers.{block.layer_idx}.bias"] = torch.ones(4)
    save_file(tensors, str(tmp_path / "r.safetensors"))
    load_router_weights(model, str(tmp_path / "r.safetensors"))
    for block in model.moe_blocks:
        assert torch.all(block.router.weight == block.layer_idx)


def test_max_samples_takes_a_seeded_subset_of_every_source():
    records = [{"modality": "CT"}] * 50 + [{"modality": "Pathology"}] * 50
    kept, y = labelled(records, max_samples=20, seed=0)
    assert len(kept) == 20 and set(y.tolist()) == {0, 3}
    assert labelled(records, max_samples=20, seed=0)[1].tolist() == y.tolist()


def test_heldout_split_keeps_an_image_on_one_side():
    images = [f"img{i // 3}" for i in range(30)]  # 10 images, 3 questions each
    train_idx, held_idx = heldout_split(30, 0.2, seed=0, groups=images)
    assert len(held_idx) == 6 and len(train_idx) == 24
    assert not {images[i] for i in held_idx.tolist()} & {images[i] for i in train_idx.tolist()}
    assert heldout_split(30, 0.2, seed=0, groups=images)[1].tolist() == held_idx.tolist()


def questions_of_growing_length(start: str, filler: str, end: str, seed: int) -> list[dict]:
    """Five records with random images, each question longer than the last (padding happens)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [{"id": str(i), "question": start + filler * i + end,
             "image": Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())}
            for i in range(5)]


def test_batched_router_features_equal_one_sample_at_a_time(tiny):
    model, processor = tiny
    records = questions_of_growing_length("what is ", "very very very ", "odd here?", seed=1)
    records[3]["image"] = None  # a text-only question inside a batch with images
    with one_thread():
        alone = pooled_features(model, processor, records, progress=False, batch_size=1)
        batched = pooled_features(model, processor, records, progress=False, batch_size=4)
    assert alone.shape == (5, model.config.hidden_size)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_batched_ffn_inputs_equal_a_plain_one_sample_forward(tiny):
    from medmoe.data.templates import Turn
    from medmoe.moe.upcycle import decoder_layers, ffn_attribute
    from medmoe.training.router import ffn_inputs

    model, processor = tiny
    records = questions_of_growing_length("where is ", "the big the big ", "lesion?", seed=2)
    layers = [0, 1]
    reference = {i: [] for i in layers}
    blocks = decoder_layers(model.language_model)
    hooks = [getattr(blocks[i], ffn_attribute(blocks[i])).register_forward_hook(
        lambda mod, args, out, i=i: reference[i].append(args[0][0])) for i in layers]
    lengths = []
    with one_thread(), torch.no_grad():
        for r in records:  # the plain way: one sample, the full model, no padding
            ids = torch.tensor([processor.encode([Turn(processor.prompt(r["question"], True), None)]).input_ids])
            model(input_ids=ids, pixel_values=processor.image_tensor(r["image"]).unsqueeze(0))
            lengths.append(ids.shape[1])
        for h in hooks:
            h.remove()
        batched = ffn_inputs(model, processor, records, layers, progress=False, batch_size=3)
    assert len(set(lengths)) == 5  # padding really happens inside a batch
    for i in layers:
        tokens, owner = batched[i]
        assert owner.tolist() == [n for n, length in enumerate(lengths) for _ in range(length)]
        torch.testing.assert_close(tokens.float(), torch.cat(reference[i]).bfloat16().float(), rtol=2e-2, atol=2e-2)
