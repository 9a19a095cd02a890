"""Fused query/key/value projections (engine/fused_projections.py): the same outputs as the three
projections, for every tiny architecture, in the forward pass, the fast decode and int8; on Phi's
parallel layers the FFN's projections (the MLP's, or a Med-MoE block's meta expert's) join them."""

import pytest
import torch
from PIL import Image

from medmoe.errors import ConfigError
from medmoe.engine.static_decode import decode
from medmoe.engine.fused_projections import (DeferredDense, FusedQKV, HandedOver, ParallelOut, _Handoff, count_parallel, fuse_qkv,
                                    is_fused, unfuse_qkv)
from medmoe.model.pretrained import build_model


def _batch(processor):
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 20), (10, 90, 200))]
    return processor(["What modality is this image?", "Any fracture?"], images, padding_side="left")


@pytest.mark.parametrize("preset", ["tiny", "tiny-phi", "tiny-stablelm", "tiny-qwen2"])
def test_fused_logits_and_decoded_tokens_equal_the_three_projections(preset):
    model, processor = build_model(preset)
    model.upcycle()
    model.eval()
    batch = _batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    tokens_before = decode(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5)
    count = fuse_qkv(model)
    layers = model.language_model.config.num_hidden_layers
    assert count == layers and is_fused(model)
    assert count_parallel(model) == (layers if preset == "tiny-phi" else 0)  # dense and MoE layers alike
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    tokens_after = decode(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5)
    assert torch.equal(tokens_before, tokens_after)


def test_bias_of_each_part_is_kept_and_unfuse_restores_the_weights():
    model, processor = build_model("tiny-phi")  # Phi's projections have biases
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("q_proj.bias") for k in state)
    fuse_qkv(model)
    assert count_parallel(model) >= 2
    assert not any(k.endswith(("k_proj.weight", "fc1.weight", "dense.bias")) for k in model.state_dict())
    assert unfuse_qkv(model) >= 2 and not is_fused(model) and count_parallel(model) == 0
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_a_fused_model_is_not_saved(tmp_path):
    model, _ = build_model("tiny")
    fuse_qkv(model)
    with pytest.raises(ConfigError, match="unprepare"):
        model.save_pretrained(str(tmp_path / "m"))


def test_key_before_query_is_an_error():
    handoff = _Handoff()
    lin = [torch.nn.Linear(4, n) for n in (4, 2, 2)]
    q = FusedQKV(*lin, handoff)
    k = HandedOver(handoff, "k")
    with pytest.raises(RuntimeError, match="k_proj ran before q_proj"):
        k(torch.zeros(1, 4))
    x = torch.randn(3, 4)
    assert torch.allclose(q(x), lin[0](x)) and torch.allclose(k(x), lin[1](x))


def test_int8_quantisation_reaches_the_fused_product():
    from medmoe.serving.quantize import Int8Linear, quantize_int8

    model, processor = build_model("tiny")
    model.eval()
    fuse_qkv(model)
    quantize_int8(model)
    fused = [m for m in model.modules() if isinstance(m, FusedQKV)]
    assert fused and all(isinstance(m.linear, Int8Linear) for m in fused)
    with torch.no_grad():
        assert torch.isfinite(model(**_batch(processor)).logits).all()


def test_load_for_inference_fuses_on_request_and_by_default_on_a_gpu_only(tmp_path):
    from medmoe.loading import load_for_inference

    model, processor = build_model("tiny")
    model.save_pretrained(str(tmp_path / "m"))
    processor.save_pretrained(str(tmp_path / "m"))
    plain, _ = load_for_inference(str(tmp_path / "m"), "cpu")
    fused, _ = load_for_inference(str(tmp_path / "m"), "cpu", fuse_qkv=True)
    assert not is_fused(plain) and is_fused(fused.language_model)
    assert not is_fused(fused.vision_tower)


def test_parallel_fusion_equals_the_six_products_with_or_without_biases():
    torch.manual_seed(0)
    q, k, v, fc1 = (torch.nn.Linear(8, n) for n in (8, 4, 4, 16))
    dense, fc2 = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(16, 8)
    handoff = _Handoff()
    fused_in = FusedQKV(q, k, v, handoff, fc1=fc1)
    take_k, take_v, take_fc1 = (HandedOver(handoff, p) for p in ("k", "v", "fc1"))
    out = ParallelOut(dense, fc2, handoff)
    deferred = DeferredDense(8, handoff).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.allclose(fused_in(x), q(x), atol=1e-6)
        assert torch.allclose(take_k(x), k(x), atol=1e-6) and torch.allclose(take_v(x), v(x), atol=1e-6)
        h = torch.nn.functional.gelu(take_fc1(x.reshape(6, 8)))  # a Med-MoE block flattens the tokens
        assert h.shape == (6, 16)
        attn = torch.randn(2, 3, 8)
        zeros = deferred(attn)
        assert zeros.shape == (2, 3, 8) and not zeros.any()
        want = dense(attn).reshape(6, 8) + fc2(h)
        assert torch.allclose(out(h), want, atol=1e-5)
    parts = out.unfused()
    assert parts[0].bias is None and torch.equal(parts[1].bias, fc2.bias)
    assert torch.equal(parts[0].weight, dense.weight) and torch.equal(parts[1].weight, fc2.weight)


def test_parallel_products_in_the_wrong_order_or_in_training_are_errors():
    handoff = _Handoff()
    out = ParallelOut(torch.nn.Linear(4, 4), torch.nn.Linear(8, 4), handoff)
    with pytest.raises(RuntimeError, match="fc2 ran before the attention's dense"):
        out(torch.zeros(1, 8))
    with pytest.raises(RuntimeError, match="unfuse_qkv"):
        DeferredDense(4, handoff).train()(torch.zeros(1, 4))


def test_parallel_fusion_can_be_left_off_and_skips_lora_experts():
    model, _ = build_model("tiny-phi")
    model.upcycle()
    assert fuse_qkv(model, parallel=False) == 4 and count_parallel(model) == 0
    model, _ = build_model("tiny-phi")
    model.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    fuse_qkv(model)
    assert count_parallel(model) == 4 - len(model.moe_blocks)  # the dense layers only
