"""The static-cache decode path gives the same greedy tokens as recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medmoe.engine.static_decode import decode, generate_fast
from medmoe.model.pretrained import build_model


def greedy_reference(model, input_ids, attention_mask, pixel_values, steps):
    """No cache: the full, growing sequence through model.forward at every step (per-sample
    routing pools the prompt, as decoding does)."""
    ids, mask, new = input_ids, attention_mask, []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt = torch.cat([attention_mask, torch.zeros_like(mask[:, attention_mask.shape[1]:])], 1)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, position_ids=positions,
                       prompt_mask=prompt).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(new, 1)


@pytest.mark.parametrize("name", ["tiny", "tiny-phi"])
@pytest.mark.parametrize("routing", ["token", "sample", "pooled"])
@pytest.mark.parametrize("expert_type", ["full", "lora"])
def test_static_decode_matches_full_recompute(name, routing, expert_type):
    model, processor = build_model(name)
    model.upcycle({"routing": routing, "expert_type": expert_type, "expert_lora": {"rank": 4, "alpha": 8}})
    for block in model.moe_blocks:  # make experts differ, so routing matters
        with torch.no_grad():
            for weight in (block.experts.w_in,) if expert_type == "full" else (block.experts.b_in, block.experts.b_out):
                weight.add_(torch.randn_like(weight) * 0.05)
    model.eval()
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 20), (10, 90, 200))]
    batch = processor(["What modality is this image?", "Any fracture?"], images, padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    ref = greedy_reference(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], 6)
    fast = decode(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=6)
    assert torch.equal(fast, ref)


def test_generate_fast_returns_one_text_per_question():
    model, processor = build_model("tiny")
    model.upcycle()
    texts = generate_fast(model.eval(), processor, ["a?", "a longer question?"], None, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_eos_repeats_after_the_end():
    model, processor = build_model("tiny")
    model.eval()
    batch = processor(["hello"], None)
    first = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=3)
    eos = int(first[0, 1])
    tokens = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=5, eos_token_id=eos)
    assert (tokens[0, 1:] == eos).all()


def test_any_of_several_end_tokens_ends_a_row():
    model, processor = build_model("tiny")
    model.eval()
    batch = processor(["hello", "what is this?"], None, padding_side="left")
    free = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    ends = {int(free[0, 2]), int(free[1, 3])}  # each row meets one of them
    tokens = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6, eos_token_id=ends)
    for row, at in ((0, 2), (1, 3)):
        first = next(j for j in range(6) if int(free[row, j]) in ends)
        assert first <= at
        assert torch.equal(tokens[row, :first + 1], free[row, :first + 1])  # unchanged up to its end
        assert (tokens[row, first:] == free[row, first]).all()  # then its own end token repeats


def test_graph_safe_accepts_fused_lora_experts_and_refuses_the_loop():
    from medmoe.engine.static_decode import graph_safe

    lora, _ = build_model("tiny")
    lora.upcycle({"expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    assert graph_safe(lora, torch.float32, torch.device("cpu"))
    looped, _ = build_model("tiny")
    looped.upcycle()
    looped.set_dispatch("loop")
    assert not graph_safe(looped, torch.float32, torch.device("cpu"))


def test_compiled_step_is_built_once_per_mode():
    from medmoe.engine.static_decode import compiled_step

    default, autotuned = compiled_step(), compiled_step("max-autotune-no-cudagraphs")
    assert default is compiled_step(None) and autotuned is compiled_step("max-autotune-no-cudagraphs")
    assert default is not autotuned  # torch.compile is lazy: nothing is compiled until a step runs
