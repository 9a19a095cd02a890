"""Custom GPU kernels of the MoE block and the decode step (Triton), each beside the plain PyTorch
it must equal.

- `bias_act(h, bias, group, act)`: act(h + bias[group[i]]) row by row, for the rows of a grouped
  GEMM (`torch._grouped_mm` has no bias epilogue): one pass over the [N, f] intermediate instead
  of an [N, E] x [E, f] matmul for the bias and another pass for the GELU. Backward is one pass
  too; the bias gradient stays an [E, N] x [N, f] matmul (deterministic, no atomics).
- `expert_matvec(x, w, expert)`: row s of x times w[expert[s]], for the few rows of a decode step.
  The expert index is read on the device (no host sync, CUDA-graph safe) and each chosen expert's
  weights are streamed once, split along K so that every SM takes part: a grouped GEMM at one
  row runs at a fraction of the memory bandwidth.
  Its tile sizes are autotuned per shape on first use (a few seconds, in the eager steps before
  a decode step is captured as a CUDA graph).
- `linear(x, weight, bias)`: F.linear, where one row on a GPU (a batch-1 decode step) goes through
  a matrix-vector kernel over the `nn.Linear` weight [N, K]: each program reads whole rows of the
  weight (K contiguous, the loop over K unrolled, no split), at 4.0 TB/s on the H200 where cuBLAS's
  GEMV reaches 3.3 (docs/speed.md). Tiles autotuned per shape on first use, as above.

Both are torch custom ops: opaque to torch.compile, shaped on the meta device, and on the CPU (or
without Triton) they run the PyTorch reference, which the CPU tests compare with autograd.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "gelu_tanh")


@functools.lru_cache(maxsize=None)
def _triton():
    if importlib.util.find_spec("triton") is None:
        return None
    return _build_kernels()


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    # A constant to torch.compile: tracing into the cache and the import machinery would break the graph.
    return _triton() is not None


def triton_ready(t: torch.Tensor) -> bool:
    """True where the Triton kernels run: a CUDA tensor and Triton installed."""
    return t.device.type == "cuda" and _triton_installed()


# ----- PyTorch references ------------------------------------------------------------------------

def _bias_act_reference(h: torch.Tensor, bias: torch.Tensor, group: torch.Tensor, act: str) -> torch.Tensor:
    pre = h + bias.to(h.dtype).index_select(0, group)
    return F.gelu(pre, approximate="tanh") if act == "gelu_tanh" else pre


def _bias_act_backward_reference(grad, h, bias, group, act: str) -> torch.Tensor:
    if act == "none":
        return grad.clone()
    pre = h + bias.to(h.dtype).index_select(0, group)
    return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")


def _matvec_reference(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x.unsqueeze(1), w.index_select(0, expert)).squeeze(1)


# ----- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("medmoe::bias_act", mutates_args=())
def _bias_act(h: torch.Tensor, bias: torch.Tensor, group: torch.Tensor, act: str) -> torch.Tensor:
    if triton_ready(h):
        return _triton().bias_act(h, bias, group, act)
    return _bias_act_reference(h, bias, group, act)


@_bias_act.register_fake
def _(h, bias, group, act):
    return torch.empty_like(h)


@torch.library.custom_op("medmoe::bias_act_backward", mutates_args=())
def _bias_act_backward(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, group: torch.Tensor,
                       act: str) -> torch.Tensor:
    if triton_ready(h):
        return _triton().bias_act_backward(grad, h, bias, group, act)
    return _bias_act_backward_reference(grad, h, bias, group, act)


@_bias_act_backward.register_fake
def _(grad, h, bias, group, act):
    return torch.empty_like(h)


def _bias_act_setup(ctx, inputs, output):
    h, bias, group, act = inputs
    ctx.act = act
    ctx.save_for_backward(h, bias, group)


def _bias_act_grad(ctx, grad):
    h, bias, group = ctx.saved_tensors
    grad_h = grad if ctx.act == "none" else _bias_act_backward(grad.contiguous(), h, bias, group, ctx.act)
    grad_bias = None
    if ctx.needs_input_grad[1]:
        one_hot = F.one_hot(group, bias.shape[0]).to(grad_h.dtype)
        grad_bias = (one_hot.T @ grad_h).to(bias.dtype)
    return grad_h, grad_bias, None, None


_bias_act.register_autograd(_bias_act_grad, setup_context=_bias_act_setup)


def bias_act(h: torch.Tensor, bias: torch.Tensor, group: torch.Tensor, act: str = "gelu_tanh") -> torch.Tensor:
    """act(h[i] + bias[group[i]]) for h [N, f], bias [E, f], group [N]; act "gelu_tanh" or "none"."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: act must be one of {ACTIVATIONS}, not {act!r}")
    return _bias_act(h.contiguous(), bias.contiguous(), group, act)


MATVEC_PROGRAMS_PER_SM = 8
MATVEC_PLAN_BLOCK_N, MATVEC_GRANULE = 256, 128  # the split count is planned with; k_per_split's multiple


def matvec_splits(s: int, k: int, n: int, device: torch.device) -> tuple[int, int]:
    """(splits, k_per_split) for the matrix-vector kernel on `device`: one split off CUDA. Shapes
    only: the fake kernels use it too, so it must not depend on the tuned tiles."""
    if device.type != "cuda":
        return 1, k
    return plan_splits(s, k, n, torch.cuda.get_device_properties(device).multi_processor_count)


def plan_splits(s: int, k: int, n: int, sms: int) -> tuple[int, int]:
    """Split K until about MATVEC_PROGRAMS_PER_SM programs per SM stream weights, in multiples of
    MATVEC_GRANULE (the largest BLOCK_K), preferring a split that divides K (no masked tail)."""
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    nominal_n, granule = MATVEC_PLAN_BLOCK_N, MATVEC_GRANULE
    target = max(1, min(ceil(MATVEC_PROGRAMS_PER_SM * sms, max(s * ceil(n, nominal_n), 1)), ceil(k, granule)))
    k_per_split = ceil(ceil(k, target), granule) * granule
    dividing = next((m for m in range(k_per_split, k + 1, granule) if k % m == 0), None)
    if dividing is not None and dividing <= 2 * k_per_split:
        k_per_split = dividing
    return ceil(k, k_per_split), k_per_split


@torch.library.custom_op("medmoe::expert_matvec", mutates_args=())
def _expert_matvec(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    if triton_ready(x):
        return _triton().expert_matvec(x, w, expert)
    return _matvec_reference(x, w, expert).unsqueeze(0)


@_expert_matvec.register_fake
def _(x, w, expert):
    splits, _ = matvec_splits(x.shape[0], x.shape[1], w.shape[2], x.device)
    return x.new_empty(splits, x.shape[0], w.shape[2], dtype=x.dtype if splits == 1 else torch.float32)


def expert_matvec(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """[S, K] rows times stacked weights [E, K, N] -> [S, N]: row s uses w[expert[s]]. Inference only.
    The kernel returns split-K partial sums (fp32); they are added here, outside the custom op, so
    that torch.compile fuses the sum with what follows (bias, activation, gate weight)."""
    part = _expert_matvec(x.contiguous(), w.contiguous(), expert)
    return part[0] if part.shape[0] == 1 else part.sum(0).to(x.dtype)


LINEAR_MATVEC_K_MULTIPLE = 256  # the kernel has no masks: K a multiple of its smallest BLOCK_K
linear_matvec_enabled = True  # False: one row goes to cuBLAS too (medmoe bench --no-linear-matvec)


def linear_matvec_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of x (a batch-1 decode step) on a GPU with Triton, a contiguous 16-bit [N, K] weight in
    x's dtype, K a multiple of LINEAR_MATVEC_K_MULTIPLE, no gradient wanted (the kernel has no
    backward). Shapes, dtypes and grad mode only: static under compile."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (linear_matvec_enabled and not wants_grad and x.numel() == x.shape[-1]
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.dim() == 2 and weight.shape[1] % LINEAR_MATVEC_K_MULTIPLE == 0 and weight.is_contiguous()
            and triton_ready(x))


@torch.library.custom_op("medmoe::linear_matvec", mutates_args=())
def _linear_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if triton_ready(x):
        return _triton().linear_matvec(x, weight, bias)
    return F.linear(x, weight, bias)


@_linear_matvec.register_fake
def _(x, weight, bias=None):
    return x.new_empty(1, weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); one row on a GPU without gradients by the matrix-vector kernel,
    which adds the bias too: a product that feeds another op (the overlapped experts' join, the
    rotary embedding's) then needs no kernel of its own for the bias."""
    if not linear_matvec_applies(x, weight):
        return F.linear(x, weight, bias)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    y = _linear_matvec(x.reshape(1, -1).contiguous(), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----- Triton ----------------------------------------------------------------------------------------

def _build_kernels():
    """The Triton kernels and their launchers (built on first use, only where Triton is installed)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(u):
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)

    @triton.jit
    def bias_act_fwd(h_ptr, b_ptr, g_ptr, y_ptr, n_cols, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        grp = tl.load(g_ptr + row).to(tl.int64)
        x = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(b_ptr + grp * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:
            x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
        tl.store(y_ptr + row * n_cols + cols, x.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def gelu_bwd(dy_ptr, h_ptr, b_ptr, g_ptr, dh_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        grp = tl.load(g_ptr + row).to(tl.int64)
        x = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(b_ptr + grp * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        tl.store(dh_ptr + row * n_cols + cols, (dy * slope).to(dh_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def matvec(x_ptr, w_ptr, e_ptr, part_ptr, S, K, N, k_per_split,
               EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC_2D: tl.constexpr):
        # Program (row s, block of N, split of K). ACC_2D: a [BLOCK_K, BLOCK_N] accumulator reduced
        # over K once at the end; else each tile is reduced as it arrives (fewer registers, so
        # larger tiles: more loads in flight per thread).
        s = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        n_mask = offs_n < N
        w_base = w_ptr + tl.load(e_ptr + s).to(tl.int64) * K * N
        k_start = split * k_per_split
        if ACC_2D:
            acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            w_ptrs = w_base + offs_k[:, None].to(tl.int64) * N + offs_n[None, :]
            if EVEN:
                xk = tl.load(x_ptr + s * K + offs_k).to(tl.float32)
                wt = tl.load(w_ptrs).to(tl.float32)
            else:
                k_mask = offs_k < K
                xk = tl.load(x_ptr + s * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            if ACC_2D:
                acc2 += xk[:, None] * wt
            else:
                acc += tl.sum(xk[:, None] * wt, axis=0)
        if ACC_2D:
            acc = tl.sum(acc2, axis=0)
        tl.store(part_ptr + (split * S + s) * N + offs_n, acc, mask=n_mask)

    def configs(tiles):
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "ACC_2D": acc2}, num_warps=w, num_stages=st)
                for bn, bk, w, st, acc2 in tiles]

    even = triton.heuristics({"EVEN": lambda a: a["K"] % a["k_per_split"] == 0 and a["k_per_split"] % a["BLOCK_K"] == 0
                              and a["N"] % a["BLOCK_N"] == 0})
    # (BLOCK_N, BLOCK_K, warps, stages, ACC_2D); BLOCK_K at most MATVEC_GRANULE. The first tile is
    # the one the kernel had before autotuning, kept as a candidate.
    matvec_experts = triton.autotune(configs([
        (256, 128, 2, 3, False), (256, 64, 2, 3, False), (128, 128, 2, 3, False), (256, 128, 4, 3, False),
        (512, 64, 4, 3, False), (512, 128, 4, 3, False), (256, 128, 8, 3, False), (128, 128, 1, 3, False),
        (256, 32, 4, 3, True), (512, 32, 8, 3, True)]), key=["K", "N", "k_per_split"])(even(matvec))

    @triton.jit
    def linear_matvec_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program: BLOCK_N whole rows of W [N, K]; the loop over K is unrolled, so every load of a
        # row is issued before the sums need them (the bytes in flight are what a GEMV runs on).
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows[:, None].to(tl.int64) * K
        if HAS_BIAS:  # loaded first, so that its latency overlaps the weights' loads
            bias = tl.load(b_ptr + rows).to(tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            w = tl.load(w_rows + k0 + cols[None, :], eviction_policy="evict_first")  # read once
            acc += w.to(tl.float32) * tl.load(x_ptr + k0 + cols).to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += bias
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))

    def fitting(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [c for c in configs if args["N"] % c.kwargs["BLOCK_N"] == 0 and args["K"] % c.kwargs["BLOCK_K"] == 0]

    # (BLOCK_N, BLOCK_K, warps): the fastest on the H200 for Phi-2's fused products
    # and their neighbours; BLOCK_K 256 fits every K the op accepts.
    linear_matvec_tuned = triton.autotune(
        [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1)
         for bn, bk, w in ((1, 512, 2), (2, 512, 4), (4, 256, 2), (4, 512, 4), (1, 256, 2), (2, 256, 2))],
        key=["N", "K"], prune_configs_by={"early_config_prune": fitting})(linear_matvec_kernel)

    block = 1024

    class Kernels:
        matvec_tuner = matvec_experts  # .cache: the tile chosen per shape
        linear_matvec_tuner = linear_matvec_tuned

        @staticmethod
        def linear_matvec(x, weight, bias):
            n, k = weight.shape
            y = torch.empty(1, n, device=x.device, dtype=x.dtype)
            linear_matvec_tuned[lambda meta: (n // meta["BLOCK_N"],)](x, weight, bias if bias is not None else y, y, n,
                                                                      K=k, HAS_BIAS=bias is not None)
            return y

        @staticmethod
        def bias_act(h, bias, group, act):
            y = torch.empty_like(h)
            n, f = h.shape
            if n:
                bias_act_fwd[(n, triton.cdiv(f, block))](h, bias, group, y, f, ACT=ACTIVATIONS.index(act),
                                                         BLOCK=block, num_warps=4)
            return y

        @staticmethod
        def bias_act_backward(grad, h, bias, group, act):
            dh = torch.empty_like(h)
            n, f = h.shape
            if n:
                gelu_bwd[(n, triton.cdiv(f, block))](grad, h, bias, group, dh, f, BLOCK=block, num_warps=4)
            return dh

        @staticmethod
        def expert_matvec(x, w, expert):
            """Partial sums [splits, S, N] (fp32; x's dtype when K is not split): see matvec_splits."""
            s, k = x.shape
            n = w.shape[2]
            splits, k_per_split = matvec_splits(s, k, n, x.device)
            part = torch.empty(splits, s, n, device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
            if s:
                matvec_experts[lambda meta: (s, triton.cdiv(n, meta["BLOCK_N"]), splits)](
                    x, w, expert, part, s, k, n, k_per_split)
            return part

    return Kernels
