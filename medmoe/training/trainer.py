"""The one training loop every phase uses (phases differ in data, template and trainable set).

AdamW with per-group learning rates, cosine schedule with linear warmup, gradient accumulation,
gradient clipping, bf16 autocast (GPU, and CPUs with bfloat16 hardware), optional gradient checkpointing. Progress bar with
loss / lr / tokens per second, metrics to `metrics.jsonl` (and TensorBoard when installed), a
loss-curve PNG at the end, atomic checkpoints and exact resume, an opt-in profile (profiling.py).

On a GPU nothing is read from the device between log steps (the host keeps queueing work while
the GPU runs): losses and the gradient norm are read at log steps only, tokens are counted on the
host, batches move from pinned memory without blocking.

Data order is a pure function of (seed, epoch): micro-batch m of the run is always the same
samples, so resuming at micro-batch m replays exactly what an uninterrupted run would have seen.
With sample weights (`balanced_sampling`), an epoch is as many seeded weighted draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from typing import Callable, Sequence

import torch
from torch.profiler import record_function
from torch.utils.data import DataLoader

from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..model.attention_kernels import varying_shape_attention
from ..model.pretrained import cpu_has_fast_bf16
from ..model.recompute import checkpointing_options
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistInfo, is_sharded, single_process
from .frozen_weights import frozen_weights_in
from .params import Groups
from .profiling import StepProfiler
from .recipe import PhaseRecipe

METRICS_FILE = "metrics.jsonl"


# ----- data order ---------------------------------------------------------------------------------

def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  weights: torch.Tensor | None = None) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded shuffle cut into global batches of
    batch_size * world; rank r takes slice r of each. Under several processes an incomplete last
    global batch is dropped so every rank runs the same number of steps. With `weights`, the epoch
    is num_samples seeded draws (`weighted_draws`), shuffled."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        order = torch.randperm(num_samples, generator=g).tolist()
    else:
        order = weighted_draws(weights[:num_samples], g)
    step = batch_size * world
    full = num_samples // step if world > 1 else math.ceil(num_samples / step)
    return [order[i * step + rank * batch_size: i * step + (rank + 1) * batch_size] for i in range(full)]


def weighted_draws(weights: torch.Tensor, g: torch.Generator) -> list[int]:
    """len(weights) draws in a seeded order, sample i drawn floor or ceil of its expected count
    (weights[i] scaled so that they sum to the number of samples): systematic resampling, one
    random offset. A sample of weight 1 then comes exactly once per epoch, as without weights."""
    n = len(weights)
    edges = torch.cumsum(weights.double(), 0) * (n / float(weights.sum()))
    points = torch.rand(1, generator=g, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)
    drawn = torch.searchsorted(edges, points, right=True).clamp(max=n - 1)
    return drawn[torch.randperm(n, generator=g)].tolist()


class _Batches(torch.utils.data.Sampler):
    """Micro-batches from global index `start` on, across epochs (the resumable data position)."""

    def __init__(self, n, batch_size, seed, start, stop, dist: DistInfo, weights: torch.Tensor | None = None):
        self.n, self.bs, self.seed, self.start, self.stop, self.dist = n, batch_size, seed, start, stop, dist
        self.weights = weights
        self.per_epoch = len(epoch_batches(n, batch_size, seed, 0, dist.rank, dist.world))

    def __iter__(self):
        cached_epoch, batches = None, []
        for m in range(self.start, self.stop):
            epoch, i = divmod(m, self.per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, epoch_batches(self.n, self.bs, self.seed, epoch, self.dist.rank, self.dist.world,
                                                              self.weights)
            yield batches[i]

    def __len__(self):
        return self.stop - self.start


def collate(items: Sequence[dict], pad_id: int) -> dict:
    """Right-pad input_ids/labels; stack every sample's images in order of appearance."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    pixels = []
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.as_tensor(it["input_ids"])
        labels[row, :n] = torch.as_tensor(it["labels"])
        mask[row, :n] = 1
        if it.get("pixel_values") is not None:
            pixels.append(it["pixel_values"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.cat(pixels) if pixels else None}


# ----- optimizer and schedule ----------------------------------------------------------------------

def rebind(groups: Groups, wrapped) -> Groups:
    """The same groups, with the parameter objects of the wrapped model (FSDP2 replaces them by
    sharded DTensor parameters of the same names)."""
    current = dict(getattr(wrapped, "module", wrapped).named_parameters())
    return {g: {n: current[n] for n in params} for g, params in groups.items()}


def make_optimizer(groups: Groups, phase: PhaseRecipe) -> torch.optim.AdamW:
    unknown = set(phase.lr_groups) - set(groups)
    if unknown:
        raise ConfigError(f"lr_groups has {sorted(unknown)}; this phase's parameter groups are {sorted(groups)}")
    param_groups = []
    for name, params in groups.items():
        trainable = [p for p in params.values() if p.requires_grad]
        if trainable:
            param_groups.append({"params": trainable, "lr": phase.lr_groups.get(name, phase.lr), "name": name})
    if not param_groups:
        raise ConfigError("this phase has no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=phase.lr, betas=tuple(phase.betas), weight_decay=phase.weight_decay)


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float, min_ratio: float = 0.0):
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----- logging -------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed). On resume, entries after the checkpoint go."""

    def __init__(self, run_dir: str, resumed_step: int, enabled: bool):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL only
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss(run_dir: str, title: str) -> str | None:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(run_dir, "loss.png")
    fig.savefig(out + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(out + ".tmp.png", out)
    return out


# ----- the loop ------------------------------------------------------------------------------------

def autocast_dtype(bf16: bool, device: torch.device) -> torch.dtype | None:
    """bf16 on a GPU, and on a CPU with bfloat16 hardware (where a step runs about twice as fast;
    docs/training.md); None (float32) elsewhere."""
    if bf16 and (device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())):
        return torch.bfloat16
    return None


def autocast_context(dtype: torch.dtype | None, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Autocast to `dtype` (autocast_dtype's), or nothing. Trained weights and optimizer state stay
    float32; frozen linear weights are cast once for the phase (frozen_weights.py)."""
    if dtype is not None:
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext


def _compiler_error(err: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo, inductor), not by the model itself."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer of the language model in place (`nn.Module.compile`: the
    parameters keep their names, so checkpoints and saved models are unchanged), with dynamic
    shapes since every batch has its own length. Returns how many layers."""
    from ..moe.upcycle import decoder_layers

    layers = decoder_layers(model.language_model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def step_values(micro_losses: list[dict[str, torch.Tensor]], grad_accum: int) -> dict[str, float]:
    """A step's named losses as numbers, each summed over its micro-batches divided by grad_accum,
    read from the device in one copy. Float64 on the host, added in micro-batch order: the same
    numbers as reading each loss when it was made."""
    names = [name for micro in micro_losses for name in micro]
    values = torch.stack([v.double() for micro in micro_losses for v in micro.values()]).tolist()
    out: dict[str, float] = {}
    for name, value in zip(names, values):
        out[name] = out.get(name, 0.0) + value / grad_accum
    return out


def train(model, dataset, groups: Groups, phase: PhaseRecipe, run_dir: str, *, seed: int = 0,
          collate_fn: Callable | None = None, resume: bool = False, dist: DistInfo | None = None,
          wrapped=None, recipe: dict | None = None, title: str = "training",
          on_step: Callable[[int], None] | None = None, weights: Sequence[float] | None = None,
          extra_losses: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]] | None = None) -> dict:
    """Train the parameters in `groups` on `dataset`. `wrapped` is the DDP/FSDP-wrapped model (the
    forward runs through it); `model` is the plain one. `weights`: one sampling weight per sample
    (training/data.py's `sample_weights`), else every sample once per epoch. `extra_losses(model,
    batch)`, called after each forward, gives named losses added to the model's (and logged under
    their names). Returns a summary dict."""
    dist = dist or single_process()
    wrapped = wrapped if wrapped is not None else model
    os.makedirs(run_dir, exist_ok=True)
    n = len(dataset)
    if phase.max_samples:
        n = min(n, phase.max_samples)
    if n == 0:
        raise ConfigError(f"{title}: the dataset is empty")
    per_epoch = len(epoch_batches(n, phase.batch_size, seed, 0, dist.rank, dist.world))
    if per_epoch == 0:
        raise ConfigError(f"{title}: {n} samples are fewer than one global batch ({phase.batch_size} x {dist.world} processes)")
    total_steps = phase.max_steps or max(1, math.floor(per_epoch * phase.epochs / phase.grad_accum))
    total_micro = total_steps * phase.grad_accum

    optimizer = make_optimizer(rebind(groups, wrapped), phase)
    scheduler = cosine_with_warmup(optimizer, total_steps, phase.warmup_ratio, phase.min_lr_ratio)
    step, seconds_before = 0, 0.0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt:
        state = load_checkpoint(ckpt, wrapped, optimizer, scheduler)
        step = state["step"]
        seconds_before = state["position"].get("train_seconds", 0.0)
        if dist.is_main:
            print(f"medmoe: resumed {title} from {ckpt} (step {step}/{total_steps})", flush=True)
    log = MetricsLog(run_dir, step, dist.is_main)
    if phase.grad_checkpointing != "off":
        model.gradient_checkpointing_enable(**checkpointing_options(phase.grad_checkpointing,
                                                                    phase.grad_checkpointing_every))
    model.train()

    pad_id = getattr(dataset, "pad_id", 0)
    collate_fn = collate_fn or (lambda items: collate(items, pad_id))
    sampler = _Batches(n, phase.batch_size, seed, step * phase.grad_accum, total_micro, dist,
                       None if weights is None else torch.as_tensor(weights, dtype=torch.float64))
    # The loader draws its base seed from its own generator, not the global one: a resumed run's
    # global random state (dropout) then continues exactly where the checkpoint left it. Pinned
    # batches move to a GPU without blocking the host.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=phase.num_workers,
                        generator=torch.Generator().manual_seed(seed), pin_memory=dist.device.type == "cuda")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = phase.grad_clip if phase.grad_clip > 0 else float("inf")
    dtype = autocast_dtype(phase.bf16, dist.device)
    autocast = autocast_context(dtype, dist.device)
    profiler = StepProfiler(phase.profile_steps if dist.is_main else 0, run_dir, dist.device, total_steps - step)
    compiling = phase.compile and compile_decoder_layers(model) > 0

    from tqdm.auto import tqdm

    # No value leaves the device between log steps: a read waits for the GPU, and the host could
    # not queue the next step's work meanwhile. The step's losses stay tensors until it is logged.
    bar = tqdm(total=total_steps, initial=step, desc=title, disable=not dist.is_main, dynamic_ncols=True)
    step_losses, window_tokens, window_start, last = [], 0, time.perf_counter(), None
    micro, started = 0, time.perf_counter()
    # Off unless profile_steps > 0; an interrupted run still writes what it profiled. FSDP's shards
    # keep one dtype: its frozen weights stay as they are.
    with profiler, frozen_weights_in(model, None if is_sharded(model) else dtype):
        for batch in loader:
            window_tokens += int(batch["attention_mask"].sum())  # counted on the host, before the batch moves
            batch = {k: v.to(dist.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            micro += 1
            boundary = micro % phase.grad_accum == 0
            sync = contextlib.nullcontext() if boundary or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            try:
                with sync, autocast(), varying_shape_attention(dist.device):  # a new length every batch
                    with record_function("forward"):
                        out = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      pixel_values=batch.get("pixel_values"), labels=batch["labels"], return_logits=False)
                        extra = extra_losses(model, batch) if extra_losses is not None else {}
                        loss = out.loss + sum(extra.values()) if extra else out.loss
                    with record_function("backward"):
                        (loss / phase.grad_accum).backward()
            except Exception as err:
                if compiling and _compiler_error(err):
                    raise ConfigError(f"{title}: torch.compile of the decoder layers failed ({type(err).__name__}: "
                                      f"{str(err).splitlines()[0] if str(err) else ''}); run again with "
                                      "compile=false for this phase (checkpoints resume)") from err
                raise
            step_losses.append({"loss": loss.detach(), **{name: value.detach() for name, value in extra.items()}})
            if not boundary:
                continue
            with record_function("optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % phase.log_every == 0 or step == total_steps:
                losses = step_values(step_losses, phase.grad_accum)
                now = time.perf_counter()  # after the read: the window's GPU work has finished
                last = {"step": step, "epoch": round(step * phase.grad_accum / per_epoch, 4),
                        "loss": losses.pop("loss"), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens * dist.world / max(now - window_start, 1e-9), **losses}
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                window_tokens, window_start = 0, now
            bar.update(1)
            step_losses = []
            if phase.save_every >= 0 and ((phase.save_every and step % phase.save_every == 0) or step == total_steps):
                position = {"micro_batch": step * phase.grad_accum, "epoch": step * phase.grad_accum // per_epoch,
                            "train_seconds": seconds_before + time.perf_counter() - started}
                save_checkpoint(run_dir, step, wrapped, optimizer, scheduler, position, recipe or {},
                                keep_last=phase.keep_last, is_main=dist.is_main)
            profiler.step()
            if on_step is not None:
                on_step(step)
    bar.close()
    log.close()
    if phase.grad_checkpointing != "off":
        model.gradient_checkpointing_disable() if hasattr(model, "gradient_checkpointing_disable") else None
    model.eval()
    plot = plot_loss(run_dir, title) if dist.is_main else None
    device = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else dist.device.type
    return {"steps": step, "total_steps": total_steps, "last": last, "loss_png": plot,
            "train_seconds": round(seconds_before + time.perf_counter() - started, 1),
            "device": f"{dist.world} x {device}",
            "metrics": os.path.join(run_dir, METRICS_FILE), "phase": asdict(phase)}
