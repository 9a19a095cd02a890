"""CPU latency of one short answer from the nano Med-MoE (SmolLM2-135M LLM) on a few cores.

The model is the bundled Med-MoE-Nano (trained LoRA experts, what `medmoe ask` runs) when its base
weights are installed; otherwise the nano preset upcycled with untrained experts, with a stand-in
vision tower if EfficientNet-Lite0 is missing. `model_name` names another model folder to time
instead (`medmoe bench --what cpu --model DIR`), e.g. one trained at another image size. Decoded by
the inference engine that `ask`, `serve` and `eval` run (medmoe.engine), with the end-of-sequence
token ignored so that every run produces the same number of tokens. Measured: time to the first
token (prefill, image included) and the whole answer (a fixed number of new tokens, so every run
does the same work); for LoRA experts also with the per-expert loop instead of the fused path
(`lora_loop`), and for the bundled model also with its LLM LoRA adapters kept apart instead of
merged (`adapters_unmerged`).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from PIL import Image

from ..errors import ConfigError
from ..engine import Engine, Request, encode_question
from ..generation.generate import SamplingConfig

BUNDLED = "(bundled)"


def nano_model(dtype: str = "auto", name: str = "nano"):
    """(model, processor, description): the bundled Med-MoE-Nano (or the model folder `name`), or the
    nano preset as a stand-in, in `dtype` (auto: what `ask` picks on this CPU)."""
    from ..model.presets import preset
    from ..loading import load_for_inference
    from ..model.pretrained import build_model, pick_dtype

    if name != "nano":  # a model the user names: no stand-in, its own errors
        model, processor = load_for_inference(name, device="cpu", dtype=dtype)
        return model, processor, name
    try:
        model, processor = load_for_inference("nano", device="cpu", dtype=dtype)
        return model, processor, f"Med-MoE-Nano {BUNDLED}: SmolLM2-135M-Instruct + EfficientNet-Lite0, 4 LoRA experts + meta"
    except (ImportError, ConfigError):  # base weights not installed
        pass
    try:
        model, processor = build_model("nano")
        description = "nano preset, untrained full experts: SmolLM2-135M-Instruct + EfficientNet-Lite0"
    except (ImportError, ConfigError) as err:
        cfg = preset("nano")
        cfg.vision = {**cfg.vision, "kind": "tiny", "image_size": 224, "tiny_patch": 32}
        model, processor = build_model("nano", config=cfg)
        description = f"nano LLM with a stand-in vision tower (49 x 1280 tokens; {err})"
    model.upcycle()
    return model.to(pick_dtype(dtype, torch.device("cpu"))), processor, description


def run(threads: int = 2, new_tokens: int = 16, repeats: int = 3, image=None, dtype: str = "auto", log=print,
        model_name: str = "nano") -> dict:
    torch.set_num_threads(threads)
    model, processor, description = nano_model(dtype, model_name)
    model.eval()
    img = Image.open(image).convert("RGB") if image else Image.new("RGB", (256, 256), (90, 90, 90))
    question = ["What imaging modality is shown?"]
    engine = Engine(model, processor, max_slots=1, prefix_cache_mb=0)  # the same prompt each time: prefill it all

    def answer(max_new):
        t0 = time.perf_counter()
        request = Request(encode_question(processor, question[0], img), SamplingConfig(max_new_tokens=max_new,
                                                                                        ignore_eos=True))
        text = engine.generate([request])[0].text
        return (time.perf_counter() - t0) * 1e3, text

    def timed() -> tuple[float, float, str]:
        answer(2)  # warm-up
        first = statistics.median(answer(1)[0] for _ in range(repeats))
        runs = [answer(new_tokens) for _ in range(repeats)]
        return first, statistics.median(ms for ms, _ in runs), runs[0][1]

    first, total, text = timed()
    result = {"model": description, "dtype": str(model.dtype).replace("torch.", ""), "threads": threads,
              "new_tokens": new_tokens,
              "prompt_tokens": int(processor(question, [img])["input_ids"].shape[1]),
              "image_tokens": processor.num_image_tokens,
              "first_token_ms": first, "answer_ms": total,
              "ms_per_new_token": (total - first) / max(new_tokens - 1, 1), "answer": text,
              "load_average_1min": os.getloadavg()[0]}  # other work on the machine slows this down
    log(f"cpu ({threads} threads, {result['dtype']}): first token {first:.0f} ms, "
        f"{new_tokens}-token answer {total:.0f} ms")
    lora = [b.experts for b in model.moe_blocks if hasattr(b.experts, "fuse_with_shared")]
    if lora:  # the reference: LoRA experts one at a time, then the meta FFN
        for experts in lora:
            experts.fuse_with_shared = False
        first, total, _ = timed()
        for experts in lora:
            experts.fuse_with_shared = True
        result["lora_loop"] = {"first_token_ms": first, "answer_ms": total}
        log(f"cpu, LoRA experts by the per-expert loop: first token {first:.0f} ms, answer {total:.0f} ms")
    if BUNDLED in description or model_name != "nano":  # the reference: LLM LoRA adapters kept apart, as trained
        from ..loading import load_for_inference

        model, processor = load_for_inference(model_name, device="cpu", dtype=dtype, merge_adapters=False)
        model.eval()
        engine = Engine(model, processor, max_slots=1, prefix_cache_mb=0)
        first, total, _ = timed()
        result["adapters_unmerged"] = {"first_token_ms": first, "answer_ms": total}
        log(f"cpu, LLM LoRA adapters not merged: first token {first:.0f} ms, answer {total:.0f} ms")
    return result
