"""The engine's prefill helpers: its kernel choices (model/attention_kernels.py: no cuDNN attention,
engine/prefill_kernels.py: few tower batch sizes; both on a GPU only, nothing changed on the CPU) and its host-side routing records
(engine/routing_records.py)."""

from __future__ import annotations

import torch

from medmoe.engine.prefill_kernels import tower_batch
from medmoe.model.attention_kernels import varying_shape_attention


def test_tower_batches_round_up_to_a_power_of_two_on_a_gpu_only():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [tower_batch(n, gpu) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert [tower_batch(n, cpu) for n in (1, 3, 33)] == [1, 3, 33]


def test_varying_shape_attention_leaves_cudnn_out_on_a_gpu_and_restores_the_flags():
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    with varying_shape_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    with varying_shape_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]


def test_routing_records_join_slice_and_hand_out_per_layer():
    """engine/routing_records.py: one forward's records for all its rows on the host, a row's tokens
    out of it, joined to a cached prefix's, copied when kept, and handed out per layer as the model
    records them."""
    from medmoe.engine.routing_records import forward_records, join_records, row_records
    from medmoe.moe import LayerRouting

    index = [torch.randint(0, 4, (3, 10, 1)) for _ in range(2)]
    probs = [torch.rand(3, 10, 4) for _ in range(2)]
    batch = forward_records([LayerRouting(layer, i, p) for layer, i, p in zip((0, 2), index, probs)])
    head, tail = row_records(batch, 1, 0, 4), row_records(batch, 1, 4)
    whole = join_records(head, tail)
    assert len(whole) == 10 and torch.equal(whole.expert_index[1], index[1][1])
    assert join_records(None, tail) is tail and join_records(head, None) is None
    kept = whole.slice(2, 6)
    assert kept.expert_index.data_ptr() != whole.expert_index[:, 2:].data_ptr()  # a copy, not a view
    layers = whole.as_layers()
    assert [r.layer for r in layers] == [0, 2] and layers[0].probs.shape == (1, 10, 4)
    assert torch.equal(layers[1].probs[0], probs[1][1])
    assert whole.bytes == 2 * 10 * 1 * 8 + 2 * 10 * 4 * 4


def test_routing_records_wait_for_their_copy_only_when_read():
    """Records still on their way from the device (`ready`) are made, cut per row and joined without
    waiting; the first read of their tensors waits, once."""
    from medmoe.engine.routing_records import Records, join_records, row_records

    class Copy:  # stands in for the copy's CUDA event
        waits = 0

        def synchronize(self):
            Copy.waits += 1

    index, probs = torch.randint(0, 4, (2, 3, 10, 1)), torch.rand(2, 3, 10, 4)
    batch = Records((0, 2), index, probs, ready=Copy())
    cached = Records((0, 2), torch.zeros(2, 5, 1, dtype=torch.long), torch.zeros(2, 5, 4))  # on the host already
    whole = join_records(cached, row_records(batch, 1, 0))
    assert len(whole) == 15 and whole.bytes == 2 * 15 * 8 + 2 * 15 * 4 * 4 and Copy.waits == 0
    assert torch.equal(whole.expert_index[:, 5:], index[:, 1]) and Copy.waits == 1
    assert torch.equal(whole.probs[:, :5], torch.zeros(2, 5, 4)) and Copy.waits == 1  # joined once
    kept = row_records(batch, 2, 3).slice(0, 4)
    assert torch.equal(kept.probs, probs[:, 2, 3:7]) and Copy.waits == 2
