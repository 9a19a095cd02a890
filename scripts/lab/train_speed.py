"""Nano's phase-2 training speed through the loop `medmoe train` runs (training/trainer.py), per
setting: tokens/s and seconds a step after the first steps (compilation, allocator warm-up).
Random SmolLM2-shaped weights and a random EfficientNet-Lite0 (nothing to download or carry),
LoRA on the language model and the tower trained, as the nano recipe's phase 2; synthetic image
questions of nano's phase-2 lengths (60 to 160 tokens with the 49 image tokens; the real data
averages about 100 a question), batch 64, bf16 autocast where
the device has it.

    python scripts/lab/train_speed.py [--steps 30] [--settings eager,compile] [--out speed.json]

On a GPU machine: `bash scripts/lab/gpu_engine.sh train_speed` (docs/lab/nano-v2.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from medmoe.model.pretrained import build_model, pick_device
from medmoe.training import params
from medmoe.training.recipe import PhaseRecipe
from medmoe.training.trainer import train


def samples(processor, n: int, seed: int = 0) -> list[dict]:
    """Token sequences of nano's phase-2 lengths, built directly: the random model's tokenizer reads
    characters, so real text would come out four times longer than under SmolLM2's."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length, answer = rng.randint(60, 160), rng.randint(2, 10)
        text = [rng.randrange(32, 256) for _ in range(length - processor.num_image_tokens)]
        input_ids = text[:1] + [processor.image_token_id] * processor.num_image_tokens + text[1:]
        labels = [-100] * (length - answer) + input_ids[-answer:]
        out.append({"input_ids": input_ids, "labels": labels, "id": str(i),
                    "pixel_values": torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i))})
    return out


def measure(setting: str, steps: int, batch: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, processor = build_model("nano", pretrained=False)
    model.add_llm_lora(rank=16, alpha=32)
    model.to(device)
    groups = params.select(model, params.phase2_groups(model, train_vision=True))
    phase = PhaseRecipe(lr=2e-4, max_steps=steps, batch_size=batch, log_every=5, save_every=-1,
                        compile=setting == "compile")
    data = samples(processor, steps * batch)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        train(model, data, groups, phase, run_dir, seed=0)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steady = rows[2:] or rows[-1:]  # the first ten steps compile and warm up
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    tokens_per_step = sum(len(s["input_ids"]) for s in data) / steps
    return {"setting": setting, "steps": steps, "batch": batch, "wall_s": wall, "tokens_per_s": tokens_per_s,
            "step_s": tokens_per_step / tokens_per_s, "last_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--settings", default="eager,compile")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    results = []
    for setting in args.settings.split(","):
        result = measure(setting, args.steps, args.batch, device)
        print(f"{setting}: {result['tokens_per_s']:.0f} tokens/s, {result['step_s']:.3f} s a step "
              f"(steady, after step 10), {result['wall_s']:.0f} s in all, last loss {result['last_loss']:.3f}", flush=True)
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
