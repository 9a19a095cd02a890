"""Activation recomputation (moe/recompute.py, grad_checkpointing="activations"): the FFN's
activation output is not kept for backward, is rebuilt there, and the gradients do not change."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from medmoe.bench import models
from medmoe.moe.recompute import recomputed_in_backward

TINY_PHI = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)


def ffn_step(recompute: bool, batch_dims=(6,)):
    """fc2(gelu(fc1(x))) forward; returns (a weak reference to gelu's output after forward, grads)."""
    torch.manual_seed(0)
    x = torch.randn(*batch_dims, 8, requires_grad=True)
    w1, w2 = torch.randn(16, 8, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    h = F.linear(x, w1)
    g = F.gelu(h, approximate="tanh")
    with recomputed_in_backward(g, lambda: F.gelu(h, approximate="tanh"), enabled=recompute):
        y = F.linear(g, w2)
    ref = weakref.ref(g)
    del g
    gc.collect()
    kept = ref() is not None
    y.square().sum().backward()
    return kept, [t.grad for t in (x, w1, w2)]


@pytest.mark.parametrize("batch_dims", [(6,), (2, 3)])  # 3-D: linear saves a reshaped view of g
def test_activation_output_is_not_kept_and_gradients_are_unchanged(batch_dims):
    kept_plain, plain = ffn_step(False, batch_dims)
    kept_recomputed, recomputed = ffn_step(True, batch_dims)
    assert kept_plain and not kept_recomputed  # autograd held g without the hook, not with it
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class CountActivations(TorchDispatchMode):
    """Activation forward calls: GELU (torch's, or the fused bias + GELU kernel on a GPU:
    kernels.bias_act) and SiLU."""

    OPS = ("aten::gelu", "aten::silu", "medmoe::bias_act")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func._schema.name in self.OPS and func._overloadname == "default"
        return func(*args, **(kwargs or {}))


def backward_counting(model, **batch):
    loss = model(**batch, return_logits=False).loss
    counter = CountActivations()
    with counter:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, counter.n


def phase3_grads(setting, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = models.phi2_medmoe(torch.device(device), dtype, text=TINY_PHI)
    model.train()
    if setting:
        model.gradient_checkpointing_enable(activations=True)
    ids, mask, pixels = models.image_prompt(model, 2, 6, torch.device(device), seed=1)
    grads, reruns = backward_counting(model, input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
    model.gradient_checkpointing_disable()
    assert not any(block.recompute_activations or block.experts.recompute_activations for block in model.moe_blocks)
    return grads, reruns, len(model.moe_blocks), model.language_model.config.num_hidden_layers


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
])  # on a Hopper GPU the experts take the grouped path with the fused bias + GELU kernel
def test_every_ffn_of_a_medmoe_model_recomputes_its_activation_with_the_same_gradients(device, dtype):
    plain, reruns_plain, _, _ = phase3_grads(None, device, dtype)
    recomputed, reruns, blocks, layers = phase3_grads("activations", device, dtype)
    # Backward reran the activation once per MoE layer's experts (grouped path: one call), once per
    # meta expert, and once per dense layer's FFN.
    assert reruns_plain == 0 and reruns == 2 * blocks + (layers - blocks) and blocks >= 1
    assert plain.keys() == recomputed.keys() and any(".experts." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], recomputed[name], rtol=0, atol=0, msg=name)


def test_a_dense_model_with_lora_recomputes_its_gated_ffns_with_the_same_gradients():
    """Phase 2 of the nano recipe: SmolLM2-like SwiGLU FFNs with LoRA on their projections."""
    from medmoe.data.templates import Turn
    from medmoe.model.pretrained import build_model
    from medmoe.moe import decoder_layers

    model, processor = build_model("tiny", seed=0)
    model.add_llm_lora(rank=4, alpha=8)
    for name, p in model.named_parameters():  # phase 2 trains the adapters, not the LLM's weights
        p.requires_grad_("lora" in name)
    model.train()
    batch = processor.pad([processor.encode([Turn(f"<image>\nq{i}", f"answer {i}" * 3)]) for i in range(2)])
    size = processor.vision.image_size
    batch["pixel_values"] = torch.zeros(2, 3, size, size)
    layers = decoder_layers(model.language_model)
    plain, reruns_plain = backward_counting(model, **batch)
    model.zero_grad()
    model.gradient_checkpointing_enable(activations=True)
    recomputed, reruns = backward_counting(model, **batch)
    model.gradient_checkpointing_disable()
    # SiLU once more per FFN: only the down projection's LoRA factor keeps act(gate) * up (a trained
    # base weight would keep it too, and backward would rebuild it once for each).
    assert reruns_plain == 0 and reruns == len(layers)
    assert not any("forward" in vars(layer.mlp) for layer in layers)  # the dense FFNs handed back
    assert plain.keys() == recomputed.keys() and any("lora" in n and ".mlp." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], recomputed[name], rtol=0, atol=0, msg=name)


def test_layer_checkpointing_and_activation_recompute_replace_each_other():
    from medmoe.model.pretrained import build_model
    from medmoe.moe import decoder_layers

    model, _ = build_model("tiny")
    layers = decoder_layers(model.language_model)
    model.gradient_checkpointing_enable()
    model.gradient_checkpointing_enable(activations=True)
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert all("forward" in vars(layer.mlp) for layer in layers)
    model.gradient_checkpointing_enable(selective=True)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any("forward" in vars(layer.mlp) for layer in layers)
