"""One Med-MoE FFN layer at Phi-2 size (d 2560, FFN 10240, GELU, 4 experts, top-1 + meta expert).

Paths, all on the same random weights and inputs:
- ours: `MedMoEBlock` with the grouped dispatch (sorted tokens, torch._grouped_mm, no host sync);
- ours_meta_fused: the meta expert as a 5th group of the same grouped GEMMs, its [E+1] weight
  stack built on every call (the design not taken: see moe/dispatch.py);
- loop: the same block with the per-expert loop;
- official: GShard/DeepSpeed top-1 einsum dispatch (capacity = max count, host sync) with experts
  and meta expert as transformers' PhiMLP runs them (as the official code does);
- official_fused_act: the same dispatch with our fused GELU, to separate dispatch from activation;
- floor: two dense FFNs (fused GELU); floor_hf: two dense PhiMLPs as transformers runs them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import MoEConfig
from ..moe import MedMoEBlock, MoEState, Router, StackedExperts
from ..moe.dispatch import add_group_bias, sort_by_expert
from ..moe.experts import ffn_forward
from .official_dispatch import einsum_dispatch
from ..moe.router import route
from .timing import median_ms

SIZES = (1, 8, 256, 4096, 16384)


def phi_mlp(d: int, f: int) -> nn.Module:
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    return PhiMLP(PhiConfig(hidden_size=d, intermediate_size=f, hidden_act="gelu_new"))


def build_layer(device, dtype, d: int = 2560, f: int = 10240, num_experts: int = 4):
    """(block, second dense FFN for the floor); experts get their own random weights."""
    meta = phi_mlp(d, f).to(device, dtype)
    experts = StackedExperts.from_ffn(meta, num_experts, "grouped")
    with torch.no_grad():
        for p in (experts.w_in, experts.w_out):
            p.normal_(std=0.02)
        for p in (experts.b_in, experts.b_out):
            p.normal_(std=0.02)
    router = Router(d, num_experts).to(device).requires_grad_(False)  # frozen in phase 3
    block = MedMoEBlock(0, experts, meta, MoEConfig(enabled=True), MoEState(),
                        shared_router=router)
    return block, phi_mlp(d, f).to(device, dtype)


def official_forward(block: MedMoEBlock, x: torch.Tensor, fused_act: bool) -> torch.Tensor:
    ex, meta = block.experts, block.meta

    def hf_expert(e: int, h: torch.Tensor) -> torch.Tensor:  # a deep-copied PhiMLP, as DeepSpeed holds them
        return meta.activation_fn(h @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]

    y = einsum_dispatch(x, block.router_logits(x), ex.num_experts, ex.expert_forward if fused_act else hf_expert)
    return y + (ffn_forward(meta, x) if fused_act else meta(x))


def meta_fused_forward(block: MedMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The meta expert as group E of one grouped GEMM over [E+1] weights stacked on the fly."""
    ex, meta = block.experts, block.meta
    decision = route(block.router_logits(x), block.cfg.top_k, block.cfg.renormalize)
    n, k = decision.expert_index.shape
    order, sorted_expert, ends = sort_by_expert(decision.expert_index, ex.num_experts)
    w_in = torch.cat([ex.w_in, meta.fc1.weight.T.unsqueeze(0)])
    w_out = torch.cat([ex.w_out, meta.fc2.weight.T.unsqueeze(0)])
    b_in = torch.cat([ex.b_in, meta.fc1.bias[None]])
    b_out = torch.cat([ex.b_out, meta.fc2.bias[None]])
    ends = torch.cat([ends, ends.new_full((1,), n * k + n)])
    group = torch.cat([sorted_expert, sorted_expert.new_full((n,), ex.num_experts)])
    xs = torch.cat([x.index_select(0, order // k), x])
    h = ex.hidden_act(add_group_bias(torch._grouped_mm(xs, w_in, offs=ends), b_in, group))
    out = add_group_bias(torch._grouped_mm(h, w_out, offs=ends), b_out, group)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
    routed = out[: n * k].index_select(0, inverse).view(n, k, -1)
    return (routed * decision.expert_weight.to(out.dtype).unsqueeze(-1)).sum(1) + out[n * k:]


def paths(block: MedMoEBlock, second: nn.Module) -> dict:
    def with_mode(mode):
        def run(x):
            block.experts.dispatch_mode = mode
            return block(x)
        return run

    return {
        "ours": with_mode("grouped"),
        "ours_meta_fused": lambda x: meta_fused_forward(block, x),
        "loop": with_mode("loop"),
        "official": lambda x: official_forward(block, x, fused_act=False),
        "official_fused_act": lambda x: official_forward(block, x, fused_act=True),
        "floor": lambda x: ffn_forward(block.meta, x) + ffn_forward(second, x),
        "floor_hf": lambda x: block.meta(x) + second(x),
    }


def graphed(fn, x: torch.Tensor):
    """fn(x) captured once in a CUDA graph (no autograd); returns a replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn(x)
    return graph.replay


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(device: torch.device, dtype: torch.dtype = torch.bfloat16, sizes=SIZES, hidden: int = 2560,
        ffn: int = 10240, log=print) -> dict:
    torch.manual_seed(0)
    block, second = build_layer(device, dtype, hidden, ffn)
    fns = paths(block, second)
    fp32_block = copy.deepcopy(block).float()
    fp32_block.experts.dispatch_mode = "loop"
    params = [p for p in list(block.parameters()) + list(second.parameters()) if p.requires_grad]
    rows = []
    for n in sizes:
        x = torch.randn(n, block.experts.w_in.shape[1], device=device, dtype=dtype)
        grad = torch.randn_like(x)
        row = {"tokens": n, "fwd_ms": {}, "fwd_bwd_ms": {}, "rel_err_vs_loop": {}, "rel_err_vs_fp32": {}}
        with torch.no_grad():
            ref = fns["loop"](x)
            for name in ("ours", "ours_meta_fused", "official", "official_fused_act"):
                row["rel_err_vs_loop"][name] = rel_err(fns[name](x), ref)
            # Both are rounded; against the same layer in fp32 one sees which rounds less.
            exact = fp32_block(x.float())
            row["rel_err_vs_fp32"] = {"ours": rel_err(fns["ours"](x), exact), "loop": rel_err(ref, exact)}
        for name, fn in fns.items():
            with torch.no_grad():
                row["fwd_ms"][name] = median_ms(lambda: fn(x), device)

            def step(fn=fn):
                for p in params:
                    p.grad = None
                xg = x.detach().requires_grad_()
                fn(xg).backward(grad)

            row["fwd_bwd_ms"][name] = median_ms(step, device)
        if device.type == "cuda" and n <= 256:
            row["fwd_graph_ms"] = {name: median_ms(graphed(fns[name], x), device)
                                   for name in ("ours", "floor")}
        f, fb = row["fwd_ms"], row["fwd_bwd_ms"]
        row["fwd_bwd_vs_floor"] = fb["ours"] / fb["floor"]
        row["official_over_ours_fwd_bwd"] = fb["official"] / fb["ours"]
        log(f"moe layer {n:>6} tokens: fwd ours {f['ours']:.2f} official {f['official']:.2f} loop {f['loop']:.2f} "
            f"floor {f['floor']:.2f} ms | fwd+bwd ours {fb['ours']:.2f} official {fb['official']:.2f} "
            f"loop {fb['loop']:.2f} floor {fb['floor']:.2f} ms")
        rows.append(row)
        del x, grad
    return {"config": {"hidden": hidden, "ffn": ffn, "experts": 4, "top_k": 1, "meta_expert": True,
                       "dtype": str(dtype).replace("torch.", "")}, "rows": rows}
