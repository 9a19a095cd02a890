"""Phase-3 training speed at Phi-2 size on one GPU: tokens/s and MFU, gradient checkpointing on.

Phase 3 trains the experts and the meta expert of every MoE layer (the paper's set); the rest is
frozen. Activations are recomputed in backward in every layer (`checkpoint_every=1`), or in every
n-th layer only: less recomputation for more memory; `"selective"` checkpoints every layer but keeps
the matrix products' outputs, recomputing only the cheap ops (model/recompute.py); `"activations"`
checkpoints no layer and recomputes only each FFN's activation output (moe/recompute.py; here the
experts' and meta experts': the dense FFNs are frozen and keep none).
Model FLOPs count only work an ideal implementation must do, no recomputation:
forward 2 N_act + 4 L d S per token (S = sequence length, attention scores and values),
backward 2 N_act + 8 L d S (gradients of activations) + 2 N_train_act (gradients of trained weights),
where N_act counts activated parameters (one expert + meta per MoE layer at top-1) and
N_train_act the trained ones among them. The conventional 6 N_act + 12 L d S is reported too.
"""

from __future__ import annotations

import time

import torch

from ..model.recompute import checkpointing_options
from ..training.recipe import checkpointing_setting
from .models import image_prompt, phi2_medmoe
from .timing import matmul_tflops, sync

HOPPER_BF16_DENSE_TFLOPS = 989.4  # datasheet, H100 and H200 SXM (the same compute)


def phase3_parameters(model) -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    trained = []
    for block in model.moe_blocks:
        for module in (block.experts, block.meta):
            if module is not None:
                module.requires_grad_(True)
                trained += list(module.parameters())
    return trained


def activated_params(model) -> tuple[int, int]:
    """(N_act, N_train_act) of the language model per token, embeddings excluded."""
    lm = model.language_model
    total = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    trained = 0
    for block in model.moe_blocks:
        experts = sum(p.numel() for p in block.experts.parameters())
        active = experts * block.cfg.top_k // block.experts.num_experts
        total -= experts - active
        meta = sum(p.numel() for p in block.meta.parameters()) if block.meta is not None else 0
        trained += active + meta
    return total, trained


def run(device: torch.device, batch: int = 16, text_tokens: int = 64, steps: int = 4, model=None,
        checkpoint_every: int | str = 1, log=print) -> dict:
    """One measurement; `checkpoint_every`: recompute every n-th layer's activations (1: all; 0: none;
    "selective": all layers, matrix products kept; "activations": no layer, the FFNs' activation
    outputs recomputed)."""
    model = model or phi2_medmoe(device)
    model.train()
    mode, every = checkpointing_setting(checkpoint_every)
    if mode != "off":
        model.gradient_checkpointing_enable(**checkpointing_options(mode, every))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained = phase3_parameters(model)
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
    ids, mask, pixels = image_prompt(model, batch, text_tokens, device, seed=1)
    labels = ids.clone()
    labels[:, : ids.shape[1] - text_tokens] = -100  # loss on the answer tokens only

    def step():
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    seq = ids.shape[1]
    tokens = batch * seq
    cfg = model.language_model.config
    n_act, n_train = activated_params(model)
    attn = cfg.num_hidden_layers * cfg.hidden_size * seq
    model_flops = tokens * (2 * n_act + 4 * attn + 2 * n_act + 8 * attn + 2 * n_train)
    conventional = tokens * (6 * n_act + 12 * attn)
    measured_peak = matmul_tflops(device) if device.type == "cuda" else None
    result = {
        "checkpoint_every": checkpoint_every, "batch": batch, "seq_len": seq, "tokens_per_step": tokens, "step_s": step_s,
        "tokens_per_s": tokens / step_s, "n_activated": n_act, "n_trained_activated": n_train,
        "trained_params": sum(p.numel() for p in trained),
        "model_tflops_per_step": model_flops / 1e12,
        "mfu": model_flops / step_s / (HOPPER_BF16_DENSE_TFLOPS * 1e12),
        "mfu_conventional_6n": conventional / step_s / (HOPPER_BF16_DENSE_TFLOPS * 1e12),
        "peak_tflops_used": HOPPER_BF16_DENSE_TFLOPS, "measured_matmul_tflops": measured_peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    setting = ({"selective": "selective checkpointing", "activations": "FFN activations recomputed"}.get(checkpoint_every)
               or (f"checkpointing every {checkpoint_every} layer(s)" if checkpoint_every else "no checkpointing"))
    log(f"train ({setting}): {result['tokens_per_s']:.0f} tokens/s, step {step_s:.2f} s, MFU {100 * result['mfu']:.1f}% "
        f"(6N convention {100 * result['mfu_conventional_6n']:.1f}%)")
    model.gradient_checkpointing_disable()
    optimizer.zero_grad(set_to_none=True)
    return result
