"""Fused attention layers (engine/fused_layers.py): the same logits and decoded tokens as the plain
modules for every tiny architecture, and on Phi's parallel layers with Med-MoE blocks (full and
LoRA experts, every routing); unfuse gives the same modules and state dict back."""

import pytest
import torch
from PIL import Image
from transformers.models.llama.modeling_llama import LlamaAttention

from medmoe.engine import fused_layers
from medmoe.engine.fused_layers import (FusedAttention, FusedPhiDecoderLayer, count_parallel, fuse, is_fused,
                                        unfuse)
from medmoe.engine.prepare import prepare, unprepare
from medmoe.engine.static_decode import decode
from medmoe.errors import ConfigError
from medmoe.model.pretrained import build_model


def _batch(processor):
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 20), (10, 90, 200))]
    return processor(["What modality is this image?", "Any fracture?"], images, padding_side="left")


def _moe(preset, routing="token", expert_type="full"):
    model, processor = build_model(preset)
    model.upcycle({"routing": routing, "expert_type": expert_type, "expert_lora": {"rank": 4, "alpha": 8}})
    torch.manual_seed(0)
    for block in model.moe_blocks:  # experts that differ, so that routing matters
        with torch.no_grad():
            for p in block.experts.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), processor


def _logits_and_tokens(model, batch, **kwargs):
    with torch.no_grad():
        out = model(**batch, **kwargs)
    tokens = decode(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5)
    return out, tokens


@pytest.mark.parametrize("preset", ["tiny", "tiny-phi", "tiny-stablelm", "tiny-qwen2"])
def test_fused_logits_and_decoded_tokens_equal_the_plain_modules(preset):
    model, processor = _moe(preset)
    batch = _batch(processor)
    want, want_tokens = _logits_and_tokens(model, batch)
    layers = model.language_model.config.num_hidden_layers
    assert prepare(model).fused_layers == layers and is_fused(model)
    assert count_parallel(model) == (layers if preset == "tiny-phi" else 0)  # dense and MoE layers alike
    got, tokens = _logits_and_tokens(model, batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("routing", ["token", "sample", "pooled"])
@pytest.mark.parametrize("expert_type", ["full", "lora"])
@pytest.mark.parametrize("join_max", [0, 10**6])  # the output products apart (a prefill's path) or joined
def test_phi_parallel_layers_with_medmoe_blocks_equal_the_plain_layers(routing, expert_type, join_max, monkeypatch):
    monkeypatch.setattr(fused_layers, "JOIN_MAX_TOKENS", join_max)
    model, processor = _moe("tiny-phi", routing, expert_type)
    batch = _batch(processor)
    want, want_tokens = _logits_and_tokens(model, batch, output_routing=True)
    prepare(model)
    # LoRA experts read the meta FFN's weights: those layers fuse their attention alone
    dense = 4 - len(model.moe_blocks)
    assert count_parallel(model) == (4 if expert_type == "full" else dense)
    got, tokens = _logits_and_tokens(model, batch, output_routing=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, want_tokens)
    assert [r.layer for r in got.routing] == [r.layer for r in want.routing]  # the blocks still record
    assert all(torch.equal(a.expert_index, b.expert_index) for a, b in zip(got.routing, want.routing))


def test_unfuse_gives_back_the_same_modules_weights_and_state_dict_keys(tmp_path):
    model, processor = _moe("tiny-phi")  # Phi's projections have biases
    lm = model.language_model.model
    layers, metas = list(lm.layers), [block.meta for block in model.moe_blocks]
    attentions = [layer.self_attn for layer in layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse(model.language_model) == 4
    assert all(isinstance(layer, FusedPhiDecoderLayer) for layer in lm.layers)
    assert all(block.meta is None for block in model.moe_blocks)  # the meta expert is in the layer's products
    assert not any(k.endswith(("k_proj.weight", "fc1.weight", "dense.bias")) for k in model.state_dict())
    with pytest.raises(ConfigError, match="unprepare"):
        model.save_pretrained(str(tmp_path / "m"))
    assert unfuse(model.language_model) == 4 and not is_fused(model)
    assert list(lm.layers) == layers and [layer.self_attn for layer in layers] == attentions
    assert [block.meta for block in model.moe_blocks] == metas
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    model.save_pretrained(str(tmp_path / "m"))


def test_llama_attention_without_bias_comes_back_without_bias():
    model, _ = build_model("tiny")
    keys = list(model.state_dict())
    fuse(model.language_model)
    fused = [m for m in model.modules() if isinstance(m, FusedAttention)]
    assert len(fused) == 4 and all(m.qkv.bias is None for m in fused)
    unfuse(model.language_model)
    assert list(model.state_dict()) == keys
    assert all(type(layer.self_attn) is LlamaAttention and layer.self_attn.k_proj.bias is None
               for layer in model.language_model.model.layers)


def test_only_the_classes_in_the_table_are_fused():
    class OtherAttention(LlamaAttention):  # a subclass may compute something else
        pass

    model, _ = build_model("tiny")
    layers = model.language_model.model.layers
    layers[0].self_attn = OtherAttention(model.language_model.config, 0)  # a model whose first attention is another class
    assert fuse(model.language_model) == 3
    assert type(layers[0].self_attn) is OtherAttention and isinstance(layers[1].self_attn, FusedAttention)
    assert fuse(model.language_model) == 0  # once


def test_phi_layers_can_fuse_their_attention_alone():
    model, processor = _moe("tiny-phi")
    batch = _batch(processor)
    want, _ = _logits_and_tokens(model, batch)
    assert fuse(model.language_model, parallel=False) == 4 and count_parallel(model) == 0
    assert all(block.meta is not None for block in model.moe_blocks)
    got, _ = _logits_and_tokens(model, batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)


def test_hidden_states_are_recorded_through_the_fused_phi_layers():
    """transformers records them by hooks on PhiDecoderLayer: installed before or after fusing."""
    for record_first in (True, False):
        model, processor = _moe("tiny-phi")
        embeds = torch.randn(1, 5, 64)
        run = lambda: model.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states  # noqa: E731
        with torch.no_grad():
            want = run() if record_first else None
            fuse(model.language_model)
            got = run()
            if want is None:
                unfuse(model.language_model)
                want = run()
        assert len(got) == len(want) == 5
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fused_layers_refuse_training():
    model, processor = _moe("tiny-phi")
    prepare(model)
    model.train()
    with pytest.raises(RuntimeError, match="unprepare"):
        model(**_batch(processor))


def test_int8_quantisation_reaches_the_fused_product():
    from medmoe.serving.quantize import Int8Linear, quantize_int8

    model, processor = build_model("tiny")
    model.eval()
    fuse(model.language_model)
    quantize_int8(model)
    fused = [m for m in model.modules() if isinstance(m, FusedAttention)]
    assert fused and all(isinstance(m.qkv, Int8Linear) for m in fused)
    with torch.no_grad():
        assert torch.isfinite(model(**_batch(processor)).logits).all()
    with pytest.raises(RuntimeError, match="load the model again"):
        unfuse(model.language_model)


def test_load_for_inference_fuses_on_request_and_by_default_on_a_gpu_only(tmp_path):
    from medmoe.loading import load_for_inference

    model, processor = build_model("tiny")
    model.save_pretrained(str(tmp_path / "m"))
    processor.save_pretrained(str(tmp_path / "m"))
    plain, _ = load_for_inference(str(tmp_path / "m"), "cpu")
    fused, _ = load_for_inference(str(tmp_path / "m"), "cpu", fuse_qkv=True)
    assert not is_fused(plain) and is_fused(fused.language_model)
    assert not is_fused(fused.vision_tower)


def test_stacked_products_equal_the_parts_with_or_without_biases():
    torch.manual_seed(0)
    dense, fc2 = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(16, 8)
    out = fused_layers._stacked_linear([dense, fc2], dim=1)
    attn, h = torch.randn(6, 8), torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(out(torch.cat([attn, h], -1)), dense(attn) + fc2(h), rtol=0, atol=1e-5)
    parts = fused_layers._split_linear(out, [8, 16], [None, fc2.bias], dim=1)
    assert parts[0].bias is None and torch.equal(parts[1].bias, fc2.bias)
    assert torch.equal(parts[0].weight, dense.weight) and torch.equal(parts[1].weight, fc2.weight)
