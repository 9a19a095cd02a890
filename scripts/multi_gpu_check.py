"""Do several GPUs train like one? The same training steps on one process and under torchrun
(`distributed=ddp` or `fsdp`), with the per-step loss of the whole global batch written to JSON.

    python scripts/multi_gpu_check.py --model tiny --strategy single --out single.json
    torchrun --nproc_per_node 2 scripts/multi_gpu_check.py --model tiny --strategy ddp --out ddp.json
    torchrun --nproc_per_node 2 scripts/multi_gpu_check.py --model phi2 --strategy fsdp --out fsdp.json
    python scripts/multi_gpu_check.py --compare single.json ddp.json fsdp.json

Every step draws a global batch from a seeded generator; rank r of W takes rows r::W, so one
process and W processes see the same samples. `tiny`: the random tiny Med-MoE (fp32), phase 3's
trained set (experts + meta experts). `phi2`: the Phi-2-size Med-MoE with random bf16 weights
(medmoe.bench.models), one image of 576 tokens and 64 answer tokens per sample, the same set.
The loss reported is the mean of the ranks' losses (equal token counts per rank), so it is the
loss of the global batch; the weights' checksum after the last step is written too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from medmoe.bench.models import image_prompt, phi2_medmoe  # noqa: E402
from medmoe.bench.train import phase3_parameters  # noqa: E402
from medmoe.training import distributed  # noqa: E402


def build(name: str, device: torch.device):
    torch.manual_seed(0)
    if name == "phi2":
        return phi2_medmoe(device).train(), 64
    from medmoe.model.pretrained import build_model

    model, _ = build_model("tiny", pretrained=False, seed=0)
    model.upcycle()
    return model.to(device).train(), 16


def batch_for(model, step: int, global_batch: int, text_tokens: int, device, rank: int, world: int):
    ids, mask, pixels = image_prompt(model, global_batch, text_tokens, torch.device("cpu"), seed=1000 + step)
    n_img = model.config.vision_config.num_tokens
    text = torch.ones_like(ids, dtype=torch.bool)
    text[:, 1:1 + n_img] = False
    ids[text & (ids == model.config.image_token_id)] = 0  # a random text token may equal the image token
    labels = ids.clone()
    labels[:, : ids.shape[1] - text_tokens] = -100  # loss on the answer tokens only
    rows = slice(rank, None, world)
    return {k: v[rows].to(device) for k, v in
            {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}.items()}


def run(args) -> dict:
    dist = distributed.setup()
    model, text_tokens = build(args.model, dist.device)
    if args.model == "phi2":
        model.gradient_checkpointing_enable()
    trained = phase3_parameters(model)
    wrapped = distributed.wrap(model, dist, "ddp" if args.strategy == "single" else args.strategy)
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    losses, times = [], []
    for step in range(args.steps):
        batch = batch_for(model, step, args.global_batch, text_tokens, dist.device, dist.rank, dist.world)
        start = time.perf_counter()
        loss = wrapped(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float().clone()
        if dist.enabled:
            tdist.all_reduce(mean)
            mean /= dist.world
        losses.append(float(mean))
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        times.append(time.perf_counter() - start)
    checksum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for p in trained:
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: each rank sums its shard
        checksum += local.detach().double().sum()
    if dist.enabled and args.strategy == "fsdp":
        tdist.all_reduce(checksum)
    result = {"model": args.model, "strategy": args.strategy, "world": dist.world,
              "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
              "global_batch": args.global_batch, "losses": losses, "step_s": times, "checksum": float(checksum),
              "max_memory_gib": torch.cuda.max_memory_allocated(dist.device) / 2**30
              if dist.device.type == "cuda" else None}
    if dist.is_main:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    distributed.cleanup()
    return result


def compare(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    base = runs[0]
    for r in runs:
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        print(f"{r['model']:5} {r['strategy']:6} x{r['world']}  losses {[round(x, 5) for x in r['losses']]}  "
              f"max |diff| vs {base['strategy']}: {diff:.2e}  checksum {r['checksum']:.6e}  "
              f"step {1e3 * sum(r['step_s'][1:]) / max(len(r['step_s']) - 1, 1):.0f} ms  "
              f"peak {r['max_memory_gib'] or 0:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "phi2"], default="tiny")
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="multi_gpu.json")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="print the runs' losses side by side")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
