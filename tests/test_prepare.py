"""engine.prepare, the one place a model is changed for inference: the same outputs, the core's
modules untouched and put back whole by unprepare, a prepared model refused by save_pretrained."""

import pytest
import torch

from medmoe.bench import models
from medmoe.engine.prepare import prepare, unprepare
from medmoe.errors import ConfigError
from medmoe.model.modeling import prepared_for_inference
from medmoe.moe import MedMoEBlock

TINY_PHI = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)


def test_prepare_replaces_modules_once_and_unprepare_puts_the_same_ones_back(tmp_path):
    torch.manual_seed(0)
    model = models.phi2_medmoe(torch.device("cpu"), torch.float32, text=TINY_PHI).eval()
    layers = list(model.language_model.model.layers)
    attentions, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask, pixels = models.image_prompt(model, 1, 6, torch.device("cpu"), seed=1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits

    done = prepare(model)
    assert (done.fused_layers, done.parallel_layers, done.decode_attention_layers) == (4, 4, 4)
    assert done.overlapped_moe_layers == len(model.moe_blocks) == 2
    assert prepared_for_inference(model)
    fused = list(model.language_model.model.layers)
    assert all(type(new) is not type(old) and new.inference_only for new, old in zip(fused, layers))
    # the blocks themselves hold no inference state: the fused layer around them does
    assert all(not any("overlap" in name or "started" in name for name in vars(block)) for block in model.moe_blocks)
    assert [layer.mlp for layer in fused] == [m if isinstance(m, MedMoEBlock) else None for m in mlps]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="unprepare"):
        model.save_pretrained(str(tmp_path / "m"))

    assert unprepare(model) > 0
    assert not prepared_for_inference(model)
    assert list(model.language_model.model.layers) == layers  # the same modules
    assert [layer.self_attn for layer in layers] == attentions and [layer.mlp for layer in layers] == mlps
    assert sum(isinstance(m, MedMoEBlock) for m in mlps) == 2
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
    model.save_pretrained(str(tmp_path / "m"))  # plain again


def test_prepare_can_leave_each_replacement_off():
    torch.manual_seed(0)
    model = models.phi2_medmoe(torch.device("cpu"), torch.float32, text=TINY_PHI).eval()
    done = prepare(model, fuse=False, decode_attention_kernel=False)
    assert done == type(done)(0, 0, 0, 0) and not prepared_for_inference(model)
    done = prepare(model, overlap_experts=False, decode_attention_kernel=False)
    assert done.fused_layers == 4 and done.overlapped_moe_layers == 0 and done.decode_attention_layers == 0
