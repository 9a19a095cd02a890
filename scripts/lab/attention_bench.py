"""The attention kernels a lever would swap in, at the shapes of the 32-client serve load (lab run T:
Phi-2 size, 32 heads of 80, image prompts of about 816 tokens), against what the engine runs today.
Each option's output is checked against a float32 reference, then timed with CUDA events.

Decode (one query token a row, each row's cache filled to its own length inside a slot buffer of
`--capacity` tokens, the step attending over the first `span` of them, lengths rounded up to 256):
  sdpa_bias       the engine today (engine/decode_step.py): an additive mask, cuDNN where it applies
  sdpa_efficient  the same, the memory-efficient kernel only
  flex            FlexAttention (compiled) with a block mask of each row's length
  varlen_paged    torch.nn.attention.varlen.varlen_attn over the cache as 256-token pages with
                  seqused_k: needs a [slots, capacity, heads, dim] layout (the buffer is copied into
                  one once, outside the clock), so it says what that layout would buy
Prefill (rows of about 816 new tokens, left-padded to the longest):
  sdpa_mask       the engine today (model/attention_kernels.py): flash or memory-efficient with a
                  4-D additive mask, so the memory-efficient kernel
  varlen_causal   varlen_attn over the rows' tokens packed without padding, causal
  flex            FlexAttention (compiled), causal and padding as a block mask

    python scripts/lab/attention_bench.py [--batches 1,8,32] [--out attention.json]
    python scripts/lab/attention_bench.py --smoke          # tiny shapes on the CPU: the checks only

An option the installed torch lacks is reported as skipped. On the GPU machine: `bash
scripts/lab/gpu_engine.sh attention` (under a minute, nothing carried).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import warnings

import torch
import torch.nn.functional as F

PAGE = 256


def varlen():
    """torch's varlen_attn and its parameter names, or (None, set()) where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None, None
    return flex_attention, create_block_mask


def reference(query, keys, values, visible, scale):
    """float32 softmax attention; visible: [B, Q, K] bool."""
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), keys.float()) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), values.float())


def timed(fn, iters: int) -> float:
    """Milliseconds a call, after three warm-up calls (compilation, plans)."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check(name, out, ref, results, log):
    """Worst absolute difference to the reference; out is [B, H, Q, D]."""
    diff = (out.float() - ref).abs().max().item()
    results[name] = {"max_abs_diff": diff}
    log(f"  {name:16s} max |diff| {diff:.2e}")
    return diff


def decode_case(batch, heads, dim, capacity, lengths, device, dtype, iters, compiled, log) -> dict:
    g = torch.Generator(device="cpu").manual_seed(batch)
    kv = torch.randn(2, batch, heads, capacity, dim, generator=g).to(device, dtype)
    query = torch.randn(batch, heads, 1, dim, generator=g).to(device, dtype)
    span = min(capacity, math.ceil(max(lengths) / PAGE) * PAGE)
    keys, values = kv[0, :, :, :span], kv[1, :, :, :span]
    lens = torch.tensor(lengths, device=device)
    visible = (torch.arange(span, device=device)[None, :] < lens[:, None])[:, None, :]  # [B, 1, span]
    scale = dim ** -0.5
    ref = reference(query, keys, values, visible, scale)
    results: dict = {"batch": batch, "span": span, "lengths": list(lengths)}
    options = {}

    bias = torch.full((batch, 1, 1, span), torch.finfo(dtype).min, dtype=dtype, device=device)
    bias.masked_fill_(visible[:, None], 0.0)
    options["sdpa_bias"] = lambda: F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)

    def efficient():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)
    if device.type == "cuda":
        options["sdpa_efficient"] = efficient

    flex_attention, create_block_mask = flex()
    if flex_attention is not None:
        def row_length(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        block = create_block_mask(row_length, batch, None, 1, span, device=device.type)
        run_flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        options["flex"] = lambda: run_flex(query, keys, values, block_mask=block, scale=scale)
    else:
        results["flex"] = {"skipped": "no torch.nn.attention.flex_attention"}

    varlen_attn, params = varlen()
    if varlen_attn is not None and {"seqused_k", "block_table"} <= params and device.type == "cuda":
        pages = kv.permute(0, 1, 3, 2, 4).contiguous()  # [2, B, capacity, H, D]
        per_row = capacity // PAGE
        k_pages = pages[0].view(batch * per_row, PAGE, heads, dim)
        v_pages = pages[1].view(batch * per_row, PAGE, heads, dim)
        table = torch.arange(batch * per_row, device=device, dtype=torch.int32).view(batch, per_row)
        q_rows = query[:, :, 0].contiguous()  # [B, H, D]: one token a row
        cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32)
        used = lens.to(torch.int32)

        def paged():
            out = varlen_attn(q_rows, k_pages, v_pages, cu_q, None, 1, span, scale=scale,
                              seqused_k=used, block_table=table)
            return out[:, :, None]
        options["varlen_paged"] = paged
    else:
        results["varlen_paged"] = {"skipped": "needs a GPU" if varlen_attn is not None and {"seqused_k", "block_table"} <= params
                                   else f"torch {torch.__version__}'s varlen_attn has no seqused_k and block_table"}

    for name, fn in options.items():
        try:
            check(name, fn(), ref, results, log)
            results[name]["ms"] = timed(fn, iters)
        except Exception as err:  # a kernel this card or torch does not run: reported, the rest go on
            results[name] = {"failed": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"  {name:16s} failed: {results[name]['failed']}")
    return results


def prefill_case(heads, dim, lengths, device, dtype, iters, compiled, log) -> dict:
    g = torch.Generator(device="cpu").manual_seed(len(lengths))
    rows, width = len(lengths), max(lengths)
    q, k, v = (torch.randn(rows, heads, width, dim, generator=g).to(device, dtype) for _ in range(3))
    lens = torch.tensor(lengths, device=device)
    start = width - lens  # left padding: row r's tokens are its last lengths[r] columns
    cols = torch.arange(width, device=device)
    causal = cols[None, :, None] >= cols[None, None, :]
    real = cols[None, None, :] >= start[:, None, None]
    visible = causal & real  # [rows, query, key]
    visible |= ~(cols[None, :, None] >= start[:, None, None])  # padded queries see all: no NaN rows
    scale = dim ** -0.5
    ref = reference(q, k, v, visible, scale)
    keep = (cols[None, :] >= start[:, None])  # [rows, width]: the rows' real query positions
    results: dict = {"rows": rows, "tokens": sum(lengths), "width": width}
    options = {}

    mask = torch.full((rows, 1, width, width), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask.masked_fill_(visible[:, None], 0.0)

    def sdpa_mask():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    options["sdpa_mask"] = sdpa_mask

    flex_attention, create_block_mask = flex()
    if flex_attention is not None:
        def causal_padded(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (kv_idx >= start[b])
        block = create_block_mask(causal_padded, rows, None, width, width, device=device.type)
        run_flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        options["flex"] = lambda: run_flex(q, k, v, block_mask=block, scale=scale)

    varlen_attn, params = varlen()
    if varlen_attn is not None and device.type == "cuda":
        packed = [t.transpose(1, 2)[keep] for t in (q, k, v)]  # [tokens, H, D], the rows one after another
        cu = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        cu[1:] = lens.cumsum(0)
        causal_arg = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

        def packed_causal():
            out = varlen_attn(*packed, cu, cu, width, width, scale=scale, **causal_arg)
            full = q.new_zeros(rows, width, heads, dim)
            full[keep] = out
            return full.transpose(1, 2)
        options["varlen_causal"] = packed_causal
    else:
        results["varlen_causal"] = {"skipped": "needs a GPU" if varlen_attn is not None
                                    else f"torch {torch.__version__} has no torch.nn.attention.varlen"}

    real_queries = keep[:, None, :, None]
    for name, fn in options.items():
        try:
            out = fn()
            check(name, torch.where(real_queries, out.float(), ref), ref, results, log)
            results[name]["ms"] = timed(fn, iters)
        except Exception as err:
            results[name] = {"failed": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"  {name:16s} failed: {results[name]['failed']}")
    return results


def lengths_around(n: int, mean: int, spread: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (mean - spread + torch.randint(0, 2 * spread + 1, (n,), generator=g)).tolist()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="decode rows per case")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=80)
    parser.add_argument("--capacity", type=int, default=4096, help="slot buffer length (the engine's, run T)")
    parser.add_argument("--length", type=int, default=880, help="mean cached tokens a decode row")
    parser.add_argument("--prefill-rows", default="1,3", help="prompts per prefill case")
    parser.add_argument("--prompt", type=int, default=816, help="mean tokens a prompt")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="FlexAttention eagerly (slow; for checks)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the correctness checks only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager FlexAttention: slow, but a check
        args.heads, args.head_dim, args.capacity, args.length, args.prompt, args.iters = 2, 16, 512, 40, 24, 1
        args.batches, args.prefill_rows, args.no_compile = "1,3", "1,3", True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spread = max(1, args.length // 10)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "heads": args.heads, "head_dim": args.head_dim,
              "capacity": args.capacity, "decode": [], "prefill": []}
    print(f"{report['device']}, torch {torch.__version__}, {args.heads} heads of {args.head_dim}")
    for batch in (int(b) for b in args.batches.split(",")):
        print(f"decode, batch {batch}")
        report["decode"].append(decode_case(batch, args.heads, args.head_dim, args.capacity,
                                            lengths_around(batch, args.length, spread, batch), device, dtype,
                                            args.iters, not args.no_compile, print))
    for rows in (int(r) for r in args.prefill_rows.split(",")):
        print(f"prefill, {rows} rows")
        report["prefill"].append(prefill_case(args.heads, args.head_dim,
                                              lengths_around(rows, args.prompt, max(1, args.prompt // 40), rows),
                                              device, dtype, args.iters, not args.no_compile, print))
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def table(report: dict) -> str:
    lines = ["case            option            ms      max |diff|"]
    for kind, key in (("decode", "batch"), ("prefill", "rows")):
        for case in report[kind]:
            for name, r in case.items():
                if not isinstance(r, dict):
                    continue
                label = f"{kind} {key} {case[key]}"
                if "ms" in r:
                    lines.append(f"{label:15s} {name:16s} {r['ms']:7.3f}  {r['max_abs_diff']:.1e}")
                else:
                    lines.append(f"{label:15s} {name:16s} {r.get('failed') or r.get('skipped')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
