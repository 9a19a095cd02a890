"""int8 weight-only quantisation for small machines.

Each weight matrix is stored as int8 with one float scale per output channel
(scale = max|w| / 127 over that channel's inputs) and dequantised on the fly in forward;
activations stay in the model's dtype. Applied to every nn.Linear of the language model
(attention, the dense/meta FFN, the LM head) and to the stacked domain experts, where each
expert is dequantised only when tokens reach it. Embeddings, norms, the router, the projector
and the vision tower stay as they are (small, and the router decides which expert runs).

The accuracy cost is measured by `compare` (logit and greedy-answer agreement with the
unquantised model) and written down in docs/serving.md.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import linear_weight
from ..moe import dispatch
from ..moe.experts import StackedExperts


def quantize_tensor(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-channel scales; `dim` is the input dimension reduced over."""
    w = w.detach().float()
    scale = w.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The weight it applies: a LoRA layer's adapters are folded in, never dropped.
        q, scale = quantize_tensor(linear_weight(linear), dim=1)  # weight [out, in]: one scale per output row
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int8StackedExperts(nn.Module):
    """`StackedExperts` with int8 w_in [E, d, f_in] and w_out [E, f, d] (scales per expert and output column)."""

    def __init__(self, experts: StackedExperts):
        super().__init__()
        self.num_experts, self.kind, self.act = experts.num_experts, experts.kind, experts.act
        for name in ("w_in", "w_out"):
            q, scale = quantize_tensor(getattr(experts, name), dim=1)  # [E, in, out]: reduce over inputs
            self.register_buffer(f"q_{name}", q)
            self.register_buffer(f"scale_{name}", scale.to(getattr(experts, name).dtype))
        self.b_in, self.b_out = experts.b_in, experts.b_out

    hidden_act = StackedExperts.hidden_act

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ (self.q_w_in[e].to(x.dtype) * self.scale_w_in[e].to(x.dtype))
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self.hidden_act(h) @ (self.q_w_out[e].to(x.dtype) * self.scale_w_out[e].to(x.dtype))
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        return dispatch.loop(x, expert_index, expert_weight, self.num_experts, self.expert_forward)


def quantize_int8(model) -> dict:
    """Replace the language model's linears and stacked experts in place; returns byte counts."""
    before = weight_bytes(model)
    _replace(model.language_model)
    return {"bytes_before": before, "bytes_after": weight_bytes(model)}


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        elif isinstance(child, StackedExperts):
            setattr(module, name, Int8StackedExperts(child))
        else:
            _replace(child)


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def compare(reference, quantized, processor, questions, images, max_new_tokens: int = 32) -> dict:
    """Accuracy cost of quantisation on a set of prompts: next-token logit agreement on the prompts
    (top-1 agreement, KL divergence, max |logit diff|) and exact agreement of greedy answers."""
    from ..generation import generate

    batch = processor(list(questions), list(images), padding_side="left")
    kwargs = {k: v for k, v in batch.items() if v is not None}
    ref = reference(**kwargs).logits.float()
    qnt = quantized(**kwargs).logits.float()
    mask = batch["attention_mask"].bool()
    ref, qnt = ref[mask], qnt[mask]
    kl = F.kl_div(qnt.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    start = time.perf_counter()
    answers_ref = generate(reference, processor, questions, images, max_new_tokens=max_new_tokens)
    middle = time.perf_counter()
    answers_q = generate(quantized, processor, questions, images, max_new_tokens=max_new_tokens)
    end = time.perf_counter()
    return {
        "prompts": len(questions),
        "positions": int(mask.sum()),
        "top1_agreement": float((ref.argmax(-1) == qnt.argmax(-1)).float().mean()),
        "kl_divergence": float(kl),
        "max_abs_logit_diff": float((ref - qnt).abs().max()),
        "answer_exact_agreement": sum(a == b for a, b in zip(answers_ref, answers_q)) / len(questions),
        "bytes_reference": weight_bytes(reference),
        "bytes_quantized": weight_bytes(quantized),
        "generate_seconds_reference": round(middle - start, 2),
        "generate_seconds_quantized": round(end - middle, 2),
        "examples": [{"question": q, "reference": a, "int8": b} for q, a, b in
                     list(zip(questions, answers_ref, answers_q))[:3]],
    }


def vqa_rad_prompts(folder: str, n: int) -> tuple[list[str], list[str]]:
    """The first n VQA-RAD questions and image paths (the official release's JSON)."""
    with open(os.path.join(folder, "VQA_RAD Dataset Public.json")) as f:
        rows = json.load(f)[:n]
    return ([r["question"] for r in rows],
            [os.path.join(folder, "VQA_RAD Image Folder", r["image_name"]) for r in rows])


def main(argv=None) -> None:
    """python -m medmoe.serving.quantize --model nano --vqa-rad ../shared/data/vqa-rad -n 32"""
    import argparse

    from ..model.pretrained import build_model

    p = argparse.ArgumentParser(description="accuracy cost of int8 weight-only quantisation vs float32")
    p.add_argument("--model", default="nano", help="model folder, or a preset built and upcycled here (nano, tiny)")
    p.add_argument("--vqa-rad", required=True, help="VQA-RAD folder (questions + images)")
    p.add_argument("-n", type=int, default=32, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--tiny-vision", action="store_true",
                   help="use the tiny random vision tower (the language model, which is what int8 touches, stays real)")
    args = p.parse_args(argv)
    if os.path.isdir(args.model):
        from ..loading import load_for_inference

        model, processor = load_for_inference(args.model, device="cpu", dtype="float32")
    else:
        from ..model.presets import preset

        config = preset(args.model)
        if args.tiny_vision:
            config.vision = dict(preset("tiny").vision)
        model, processor = build_model(args.model, config=config)
        model.upcycle()
    torch.set_grad_enabled(False)
    quantized = copy.deepcopy(model)
    quantize_int8(quantized)
    questions, images = vqa_rad_prompts(args.vqa_rad, args.n)
    print(json.dumps(compare(model, quantized, processor, questions, images, args.max_new_tokens), indent=2))


if __name__ == "__main__":
    main()
