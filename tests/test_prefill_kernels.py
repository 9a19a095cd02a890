"""Prefill's kernel choices (engine/prefill_kernels.py): no cuDNN attention and few tower batch sizes on
a GPU, nothing changed on the CPU."""

from __future__ import annotations

import torch

from medmoe.engine.prefill_kernels import prefill_attention, tower_batch


def test_tower_batches_round_up_to_a_power_of_two_on_a_gpu_only():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [tower_batch(n, gpu) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert [tower_batch(n, cpu) for n in (1, 3, 33)] == [1, 3, 33]


def test_prefill_attention_leaves_cudnn_out_on_a_gpu_and_restores_the_flags():
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    with prefill_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    with prefill_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
