"""Fused query/key/value projections (model/fused_qkv.py): the same outputs as the three
projections, for every tiny architecture, in the forward pass, the fast decode and int8."""

import pytest
import torch
from PIL import Image

from medmoe.errors import ConfigError
from medmoe.generation.fast_decode import decode
from medmoe.model.fused_qkv import FusedQKV, HandedOver, _Handoff, fuse_qkv, is_fused, unfuse_qkv
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
    assert count == model.language_model.config.num_hidden_layers and is_fused(model)
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
    assert not any(k.endswith("k_proj.weight") for k in model.state_dict())
    assert unfuse_qkv(model) >= 2 and not is_fused(model)
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_a_fused_model_is_not_saved(tmp_path):
    model, _ = build_model("tiny")
    fuse_qkv(model)
    with pytest.raises(ConfigError, match="unfuse_qkv"):
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
    from medmoe.model.pretrained import load_for_inference

    model, processor = build_model("tiny")
    model.save_pretrained(str(tmp_path / "m"))
    processor.save_pretrained(str(tmp_path / "m"))
    plain, _ = load_for_inference(str(tmp_path / "m"), "cpu")
    fused, _ = load_for_inference(str(tmp_path / "m"), "cpu", fuse_qkv=True)
    assert not is_fused(plain) and is_fused(fused.language_model)
    assert not is_fused(fused.vision_tower)
