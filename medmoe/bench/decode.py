"""Decode speed of a Phi-2-size Med-MoE (random weights) with a 576-token image prompt.

For each batch size: the inference engine every user path runs (`medmoe.engine.Engine`: per-slot
KV cache, one batched decode step per iteration, CUDA graphs on a GPU), with the
attention's query, key and value projections fused as `engine.prepare` does on a GPU unless
`fuse_qkv=False`, and Phi's parallel layers' FFN projections with them unless
`fuse_parallel=False`, the fused products at one row by the matrix-vector kernel unless
`linear_matvec=False`, a Med-MoE layer's experts beside its attention on a second stream unless
`overlap_experts=False`; Phi's one-kernel rotary embedding and cache write is installed unless
`decode_rotary=False` but the engine's per-row cache does not take it), the engine without graphs
and without the fusion, and a plain
transformers-style loop (DynamicCache, `model.forward` per token), beside the memory floor: the
bytes one step must read (weights of the dense layers, the meta expert and the experts in use, the
LM head, the KV cache of the mean context) over the measured copy bandwidth.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from ..engine.prepare import Prepared, prepare, unprepare
from ..engine.request import Prompt, Request
from ..engine.scheduler import Engine
from ..generation.generate import SamplingConfig
from ..moe import kernels
from .models import image_prompt, param_bytes, phi2_medmoe
from .timing import copy_bandwidth_gbs, sync


def step_bytes(model, batch: int, context: int) -> dict:
    """Bytes one decode step reads at best: activated weights + KV cache of `context` tokens."""
    lm = model.language_model
    weights = param_bytes(lm) - param_bytes(lm.get_input_embeddings())
    for block in model.moe_blocks:
        experts = block.experts
        used = min(batch * block.cfg.top_k, experts.num_experts)  # batch 1: one expert; batch 8: all four (assumed)
        weights -= param_bytes(experts) * (experts.num_experts - used) // experts.num_experts
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * context * kv_heads * head_dim * model.dtype.itemsize
    return {"weights": int(weights), "kv_cache": int(kv)}


def engine_decode(model, ids, pixels, new_tokens: int, stats: dict, compile: bool | str = False,
                  cuda_graphs: bool | None = None, engine: Engine | None = None) -> torch.Tensor:
    """New tokens [B, new_tokens] of one request per row of `ids`, all admitted at once, through the
    engine (answers of a fixed length: EOS ignored). `stats` receives prefill_ms (the first
    iteration: prefill and first decode step), step_ms (the mean of the later iterations, each one
    decode step of every row with its sampling and hand-out), steps, cuda_graph, and the engine's
    counts over the call (graph_replays, eager_steps, graph_captures, cache_growths: a measured run
    after warm-up replays graphs only)."""
    batch = ids.shape[0]
    engine = engine or Engine(model, None, max_slots=batch, max_len=ids.shape[1] + new_tokens,
                              max_prefill_tokens=ids.numel(), cuda_graphs=cuda_graphs, compile=compile,
                              prefix_cache_mb=0,  # the same prompts again: prefill_ms measures a full prefill
                              prefill_graphs=False)  # every row in one prefill forward (no staging-slot limit)
    per_image = pixels.shape[0] // batch if pixels is not None else 0
    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    handles = [engine.submit(Request(Prompt(ids[row].tolist(),
                                            pixels[row * per_image:(row + 1) * per_image] if per_image else None), cfg))
               for row in range(batch)]
    device = ids.device
    before = engine.stats.snapshot()
    sync(device)
    t0 = time.perf_counter()
    engine.step()
    sync(device)
    t1 = time.perf_counter()
    steps = 0
    while not all(h.done for h in handles):
        engine.step()
        steps += 1
    sync(device)
    t2 = time.perf_counter()
    counts = engine.stats.since(before)
    stats.update(prefill_ms=(t1 - t0) * 1e3, steps=steps, step_ms=(t2 - t1) * 1e3 / max(steps, 1),
                 cuda_graph=bool(engine.step_fn.graphs), graph_replays=counts.graph_replays,
                 eager_steps=counts.eager_steps, graph_captures=counts.graph_captures,
                 cache_growths=counts.cache_growths)
    return torch.tensor([h.result().token_ids for h in handles])


@torch.no_grad()
def plain_step_ms(model, ids, mask, pixels, steps: int) -> float:
    """ms per token of the plain loop: DynamicCache, one `model.forward` per token, host sync per token."""
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.item() if token.numel() == 1 else token.tolist()  # what a streaming loop does each token
    sync(ids.device)
    return (time.perf_counter() - t0) * 1e3 / steps


def run(device: torch.device, batches=(1, 8), new_tokens: int = 128, text_tokens: int = 64, model=None,
        plain_steps: int = 16, compile: bool | str = False, baselines: bool = True, fuse_qkv: bool = True,
        fuse_parallel: bool = True, linear_matvec: bool = True, overlap_experts: bool = True, decode_rotary: bool = True,
        log=print) -> dict:
    previous, kernels.linear_matvec_enabled = kernels.linear_matvec_enabled, linear_matvec
    try:
        return _run(device, batches, new_tokens, text_tokens, model, plain_steps, compile, baselines, fuse_qkv,
                    fuse_parallel, linear_matvec, overlap_experts, decode_rotary, log)
    finally:
        kernels.linear_matvec_enabled = previous


def _run(device, batches, new_tokens, text_tokens, model, plain_steps, compile, baselines, fuse_qkv, fuse_parallel,
         linear_matvec, overlap_experts, decode_rotary, log) -> dict:
    model = (model or phi2_medmoe(device)).eval()
    bandwidth = copy_bandwidth_gbs(device)
    rows = []
    for batch in batches:
        ids, mask, pixels = image_prompt(model, batch, text_tokens, device)
        prompt = ids.shape[1]
        row = {"batch": batch, "prompt_tokens": prompt, "new_tokens": new_tokens}
        warm = {}
        done = (prepare(model, parallel=fuse_parallel, overlap_experts=overlap_experts,
                        decode_attention_kernel=decode_rotary) if fuse_qkv else Prepared(0, 0, 0, 0))
        row["fused_parallel_layers"] = done.parallel_layers
        row["overlapped_moe_layers"] = done.overlapped_moe_layers
        row["decode_rotary_layers"] = done.decode_attention_layers
        engine = Engine(model, None, max_slots=batch, max_len=prompt + max(new_tokens, 16), max_prefill_tokens=ids.numel(),
                        compile=compile, prefix_cache_mb=0, prefill_graphs=False)  # decode steps are what it measures
        engine.warmup()  # the cache at its bound, every graph captured
        short = engine_decode(model, ids, pixels, 16, warm, engine=engine)  # warm-up: prefill kernels
        graph, eager = {}, {}
        tokens = engine_decode(model, ids, pixels, new_tokens, graph, engine=engine)
        # A compiler that failed on the step left it uncompiled (DecodeStep warns): the row says so.
        row["compile_fell_back"] = bool(compile) and not engine.step_fn.compiled
        engine_warmup = engine.stats.warmup_s, engine.stats.warmup_captures
        del engine
        unprepare(model)  # the baselines run the model as transformers does
        row["compile"], row["fused_qkv"], row["linear_matvec"] = compile, fuse_qkv, linear_matvec
        row["warmup"] = warm
        row["graph"] = graph
        row["engine_warmup_s"], row["engine_warmup_captures"] = engine_warmup
        if baselines:
            eager_tokens = engine_decode(model, ids, pixels, 16, eager, cuda_graphs=False)
            row["graph_equals_eager"] = bool(torch.equal(short, eager_tokens))
            row["plain_ms_per_step"] = plain_step_ms(model, ids, mask, pixels, plain_steps)
        else:
            eager["step_ms"] = row["plain_ms_per_step"] = float("nan")
        row["eager_static"] = eager
        nbytes = step_bytes(model, batch, prompt + new_tokens // 2)
        floor_ms = sum(nbytes.values()) / (bandwidth * 1e9) * 1e3
        row.update(step_bytes=nbytes, floor_ms_per_step=floor_ms, floor_tokens_per_s=batch / floor_ms * 1e3,
                   tokens_per_s=batch / graph["step_ms"] * 1e3,
                   eager_static_tokens_per_s=batch / eager["step_ms"] * 1e3,
                   plain_tokens_per_s=batch / row["plain_ms_per_step"] * 1e3,
                   first_tokens=tokens[0, :8].tolist())
        row["fraction_of_floor"] = row["tokens_per_s"] / row["floor_tokens_per_s"]
        log(f"decode batch {batch}: {row['tokens_per_s']:.0f} tok/s (engine, {graph['step_ms']:.2f} ms/step, "
            f"CUDA graph {graph['cuda_graph']}: {graph['graph_replays']} replays, {graph['eager_steps']} eager steps, "
            f"{graph['graph_captures']} captures, {graph['cache_growths']} cache growths; warm-up "
            f"{row['engine_warmup_captures']} captures in {row['engine_warmup_s']:.1f} s), engine eager "
            f"{row['eager_static_tokens_per_s']:.0f}, plain {row['plain_tokens_per_s']:.0f}, "
            f"floor {row['floor_tokens_per_s']:.0f} tok/s -> {100 * row['fraction_of_floor']:.0f}% of floor")
        rows.append(row)
    return {"copy_bandwidth_gbs": bandwidth, "params": sum(p.numel() for p in model.parameters()), "rows": rows}
