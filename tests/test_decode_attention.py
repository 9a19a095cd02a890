"""One-token attention split along the keys (model/decode_attention.py): its PyTorch reference and
merge equal SDPA on the CPU, the switch into transformers goes both ways, and on a CUDA GPU with
Triton the kernel equals SDPA and leaves a model's decoded tokens as they were."""

import pytest
import torch
import torch.nn.functional as F

from medmoe.model import decode_attention
from medmoe.model.pretrained import build_model
from medmoe.moe import kernels


def attention_inputs(b, h, hkv, keys, d, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for shape in
               ((b, h, 1, d), (b, hkv, keys, d), (b, hkv, keys, d)))
    attend = torch.rand(b, keys, generator=g) > 0.3
    attend[:, -1] = True  # the new token sees itself
    attend[0, : min(keys - 1, decode_attention.CHUNK)] = False  # a whole chunk masked (left padding)
    return q, k, v, attend.to(device)


def sdpa(q, k, v, attend, scale):
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                         v.float().repeat_interleave(group, 1), attn_mask=attend[:, None, None, :],
                                         scale=scale)
    return out.transpose(1, 2)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("b,heads,kv_heads,keys,d", [(2, 4, 4, 37, 16), (1, 8, 2, 200, 80), (3, 4, 1, 130, 8)])
def test_reference_and_merge_equal_sdpa(b, heads, kv_heads, keys, d):
    q, k, v, attend = attention_inputs(b, heads, kv_heads, keys, d)
    bias = decode_attention.mask_bias(attend[:, None, None, :])
    out = decode_attention.decode_attention(q, k, v, bias, d ** -0.5)
    assert out.shape == (b, 1, heads, d)
    assert rel_err(out, sdpa(q, k, v, attend, d ** -0.5)) < 1e-5
    torch.library.opcheck(decode_attention._partials, (q[:, :, 0].contiguous(), k, v, bias, 0.5))
    m, _, _ = decode_attention._partials(q[:, :, 0].contiguous(), k, v, bias, 0.5)
    assert m.shape[0] == decode_attention.splits(keys) == -(-keys // decode_attention.CHUNK)


def test_mask_bias_takes_boolean_and_additive_masks():
    attend = torch.tensor([[True, False, True]])
    additive = torch.zeros(1, 1, 1, 3).masked_fill(~attend[:, None, None, :], torch.finfo(torch.bfloat16).min)
    for mask in (attend[:, None, None, :], additive.bfloat16(), additive.float().masked_fill(additive < 0, float("-inf"))):
        bias = decode_attention.mask_bias(mask)
        assert bias.dtype == torch.float32 and torch.isfinite(bias).all()
        assert bias[0, 0] == 0 and bias[0, 2] == 0 and bias[0, 1] < -1e30


def test_use_and_drop_switch_the_attention_and_keep_the_tokens():
    from medmoe.generation.fast_decode import decode
    from PIL import Image

    model, processor = build_model("tiny-phi")
    model.upcycle()
    model.eval()
    batch = processor(["What modality is this image?"], [Image.new("RGB", (32, 32), (200, 10, 10))])
    before = decode(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=4)
    lm = model.language_model
    assert decode_attention.use_decode_attention(lm) and lm.config._attn_implementation == "medmoe_decode"
    after = decode(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=4)
    assert torch.equal(before, after)  # on the CPU the kernel does not apply: SDPA throughout
    decode_attention.drop_decode_attention(lm)
    assert lm.config._attn_implementation == "sdpa"
    lm.set_attn_implementation("eager")
    assert not decode_attention.use_decode_attention(lm)  # only SDPA is swapped


def test_load_for_inference_switches_on_request(tmp_path):
    from medmoe.model.pretrained import load_for_inference

    model, processor = build_model("tiny")
    model.save_pretrained(str(tmp_path / "m"))
    processor.save_pretrained(str(tmp_path / "m"))
    plain, _ = load_for_inference(str(tmp_path / "m"), "cpu")
    switched, _ = load_for_inference(str(tmp_path / "m"), "cpu", decode_attention=True)
    assert plain.language_model.config._attn_implementation == "sdpa"
    assert switched.language_model.config._attn_implementation == "medmoe_decode"


# ----- on a CUDA GPU with Triton ---------------------------------------------------------------------

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.triton_ready(torch.empty(0, device="cuda"))),
    reason="needs a CUDA GPU with Triton")


@needs_triton
@pytest.mark.parametrize("b,heads,kv_heads,keys,d", [(1, 32, 32, 768, 80), (2, 8, 2, 300, 64), (3, 4, 4, 37, 16)])
def test_triton_decode_attention_equals_sdpa(b, heads, kv_heads, keys, d):
    q, k, v, attend = attention_inputs(b, heads, kv_heads, keys, d, "cuda", torch.bfloat16)
    bias = decode_attention.mask_bias(attend[:, None, None, :])
    assert decode_attention.supported(q, k, attend[:, None, None, :])
    assert rel_err(decode_attention.decode_attention(q, k, v, bias, d ** -0.5), sdpa(q, k, v, attend, d ** -0.5)) < 1e-2
    torch.library.opcheck(decode_attention._partials, (q[:, :, 0].contiguous(), k, v, bias, d ** -0.5))


@needs_triton
def test_triton_decode_attention_keeps_a_models_tokens():
    from medmoe.generation.fast_decode import decode
    from PIL import Image

    model, processor = build_model("tiny-phi")
    model.upcycle()
    model = model.cuda().eval()
    batch = processor(["What modality is this image?", "Any fracture?"],
                      [Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (20, 20), (10, 90, 200))],
                      padding_side="left")
    args = [batch[n].cuda() for n in ("input_ids", "attention_mask", "pixel_values")]
    before = decode(model, *args, max_new_tokens=6, cuda_graph=False)
    decode_attention.use_decode_attention(model.language_model)
    after = decode(model, *args, max_new_tokens=6, cuda_graph=False)
    assert torch.equal(before, after)
