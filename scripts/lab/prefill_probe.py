"""Where a GPU evaluation's time goes: nano on VQA-RAD test through `run_batch` (the engine's prefill,
decode, choice scores), once to warm up, then under torch.profiler; prints the operators by host
time and by device time. python scripts/lab/prefill_probe.py DATA/vqa-rad [N]"""
import sys, time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from medmoe.evaluation.evaluate import (EvalSettings, eval_engine, read_eval_items, read_images, resolve_data_file,
                                        run_batch)
from medmoe.loading import load_for_inference

data, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256
model, processor = load_for_inference("nano")
settings = EvalSettings(model="nano", data=data, out="/tmp/probe", batch_size=64, max_new_tokens=32)
items = read_eval_items(resolve_data_file(data, "test"), "test")
engine = eval_engine(model, processor, items, settings)
engine.warmup()
for label, chunk in (("warm", items[:n]), ("probe", items[n:2 * n])):
    pixels = read_images(processor, chunk)  # path -> (pixels, digest)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if label == "probe":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_batch(model, processor, chunk, settings, engine=engine, pixels=pixels)
    else:
        run_batch(model, processor, chunk, settings, engine=engine, pixels=pixels)
    torch.cuda.synchronize()
    print(label, len(chunk), f"{time.perf_counter() - start:.2f} s", engine.stats.summary()[:400], flush=True)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
