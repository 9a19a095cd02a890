"""A Med-MoE layer's routed experts started beside its attention (engine/overlap.py, from the input
product of a fused Phi layer): the same outputs as the block's own forward, only where that forward
would do nothing else; on a GPU on a second stream, in a CUDA graph too."""

import pytest
import torch

from medmoe.bench import models
from medmoe.engine.static_decode import decode
from medmoe.engine import overlap
from medmoe.engine.fused_layers import count_overlapped, fuse, unfuse
from medmoe.engine.overlap import OverlappedMoE
from medmoe.moe import MedMoEBlock

TINY_PHI = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)


def medmoe_phi(device="cpu", dtype=torch.float32):
    """The bench's Phi Med-MoE at tiny width, its experts made different from one another (upcycled
    copies would hide a wrong routing)."""
    torch.manual_seed(0)
    model = models.phi2_medmoe(torch.device(device), dtype, text=TINY_PHI)
    with torch.no_grad():
        for block in model.moe_blocks:
            for w in (block.experts.w_in, block.experts.w_out, block.router.weight if block.router is not None else None):
                if w is not None:
                    w.add_(torch.randn_like(w) * 0.5)
    return model


def logits_and_tokens(model, device="cpu"):
    ids, mask, pixels = models.image_prompt(model, 1, 6, torch.device(device), seed=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    return logits, decode(model, ids, mask, pixels, max_new_tokens=6)


def overlapped(model) -> list[OverlappedMoE]:
    return [m.beside for m in model.modules() if getattr(m, "beside", None) is not None]


def count_starts(monkeypatch) -> list:
    calls = []
    routed = MedMoEBlock.routed_experts
    monkeypatch.setattr(MedMoEBlock, "routed_experts", lambda self, x: calls.append(self.layer_idx) or routed(self, x))
    return calls


def test_experts_started_early_give_the_blocks_outputs(monkeypatch):
    model = medmoe_phi()
    fuse(model.language_model, overlap_experts=False)
    assert count_overlapped(model) == 0
    want_logits, want_tokens = logits_and_tokens(model)
    unfuse(model.language_model)
    fuse(model.language_model)
    assert count_overlapped(model) == len(model.moe_blocks) == 2
    calls = count_starts(monkeypatch)
    logits, tokens = logits_and_tokens(model)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-6)
    assert torch.equal(tokens, want_tokens)
    # one start per MoE layer and decode step (5); the forward and the prefill, 582 tokens, run as before
    assert calls == [b.layer_idx for b in model.moe_blocks] * 5
    x = torch.randn(overlap.MAX_TOKENS + 1, TINY_PHI["hidden_size"])
    with torch.no_grad():  # a long prompt's experts run after the attention, as before
        assert not overlapped(model)[0].can_start(x) and overlapped(model)[0].can_start(x[:-1])
    assert not overlap._DONE  # every start was finished


def test_experts_start_early_only_where_the_forward_does_nothing_else(monkeypatch):
    model = medmoe_phi()
    fuse(model.language_model)
    ids, mask, pixels = models.image_prompt(model, 1, 6, torch.device("cpu"), seed=1)
    calls = count_starts(monkeypatch)
    with torch.no_grad():  # routing records come from the block's own forward
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_routing=True)
    assert calls == [] and len(out.routing) == len(model.moe_blocks)
    block, moe = model.moe_blocks[0], overlapped(model)[0]
    assert moe.block is block
    x = torch.randn(3, TINY_PHI["hidden_size"])
    with torch.no_grad():
        assert not moe.can_start(x) and not block.is_meta_plus_routed()  # still recording
        model.moe_state.start(None, record_routing=False, new_sequence=True)
        assert moe.can_start(x)
        block.cfg.routing = "sample"  # per-sample routing pools over the prompt
        assert not moe.can_start(x)
        block.cfg.routing = "token"
        block.train()
        assert not moe.can_start(x)  # training: the block's own forward, with its losses
        block.eval()
    assert not moe.can_start(x)  # gradients wanted
    assert block.meta is None  # in the fused layer's products
    unfuse(model.language_model)
    assert count_overlapped(model) == 0 and block.meta is not None
    assert sum(isinstance(m, MedMoEBlock) for m in model.language_model.modules()) == len(model.moe_blocks)


def test_a_start_on_other_tokens_is_an_error():
    model = medmoe_phi()
    fuse(model.language_model)
    moe = overlapped(model)[0]
    d = TINY_PHI["hidden_size"]
    with torch.no_grad():
        routed, product = moe.start(torch.randn(1, 2, d), torch.nn.Linear(d, 5))
        assert product.shape == (1, 2, 5) and routed.shape == (2, d)
        with pytest.raises(RuntimeError, match="started on"):
            moe.finish(routed, torch.randn(1, 3, d), torch.randn(1, 3, d))


def test_a_start_keeps_nothing_and_equals_the_blocks_parts():
    model = medmoe_phi()  # not fused: the block alone, with its meta expert
    block = model.moe_blocks[0]
    moe = OverlappedMoE(block)
    d = TINY_PHI["hidden_size"]
    x, linear = torch.randn(1, 3, d), torch.nn.Linear(d, 5)
    before = dict(vars(moe))
    assert moe.start(x, linear) is None  # gradients on: the block's own forward must run
    with torch.no_grad():
        routed, product = moe.start(x, linear)
        torch.testing.assert_close(routed, block.routed_experts(x.reshape(3, d)), rtol=0, atol=0)
        torch.testing.assert_close(product, linear(x), rtol=0, atol=1e-6)
        assert moe.start(x, torch.nn.Identity()) is None  # only a plain linear's weights go to the op
        shared = torch.randn(1, 3, d)
        torch.testing.assert_close(moe.finish(routed, shared, x), shared + routed.reshape(1, 3, d))
    assert vars(moe) == before and not overlap._DONE


def test_overlap_ops_agree_with_their_fake_shapes():
    model = medmoe_phi()
    fuse(model.language_model)
    key = overlapped(model)[0].key
    x = torch.randn(2, TINY_PHI["hidden_size"])
    with torch.no_grad():
        weight = torch.randn(5, TINY_PHI["hidden_size"])
        torch.library.opcheck(overlap._start, (x, weight, None, key, False))
        torch.library.opcheck(overlap._start, (x, weight, torch.randn(5), key, False))
        torch.library.opcheck(overlap._wait, (torch.randn_like(x), torch.randn_like(x), x, key))


def test_a_block_that_is_gone_is_named():
    key = overlap.register(torch.nn.Linear(1, 1))  # dropped at once
    with pytest.raises(RuntimeError, match="gone"):
        overlap.start(torch.zeros(1, 4), key, torch.zeros(2, 4))


# ----- on a Hopper GPU: the grouped path, a second stream, a CUDA graph ---------------------------

def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not _hopper(), reason="needs a Hopper (or newer) GPU: the experts' bf16 grouped path")
def test_experts_on_a_second_stream_equal_the_serial_block_in_a_cuda_graph(monkeypatch):
    model = medmoe_phi("cuda", torch.bfloat16)
    fuse(model.language_model, overlap_experts=False)
    want_logits, want_tokens = logits_and_tokens(model, "cuda")
    unfuse(model.language_model)
    fuse(model.language_model)
    calls = count_starts(monkeypatch)
    logits, tokens = logits_and_tokens(model, "cuda")  # decode captures its step as a CUDA graph
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    assert torch.equal(tokens, want_tokens)
    # the graph replays its steps without calling Python: two eager steps and the capture
    assert len(calls) == len(model.moe_blocks) * 3
