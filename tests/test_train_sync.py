"""The training loop reads device values only where it logs them: the logged records equal those
of a loop that read every value as soon as it was made (the loop before this rule), the losses
are read only at log steps, tokens_per_s is the rate over the log window; the losses behind the
forward select their positions with one host sync; the opt-in profile writes its tables."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from train_helpers import one_thread, samples

from medmoe.errors import ConfigError
from medmoe.model.modeling import causal_lm_loss, labelled_positions_loss
from medmoe.training import params, trainer
from medmoe.training.recipe import PhaseRecipe
from medmoe.training.tower import heads_loss
from medmoe.training.trainer import collate, cosine_with_warmup, epoch_batches, make_optimizer, train


def extra_losses(model, batch):
    """A named loss beside the model's, tied to the trained projector and to the batch."""
    return {"pixel_loss": 0.1 * model.projector[0].weight.square().mean() * batch["pixel_values"].abs().mean()}


def model_and_groups():
    from medmoe.model.pretrained import build_model

    torch.manual_seed(0)
    model, processor = build_model("tiny", seed=0)
    return model, processor, params.select(model, params.phase2_groups(model))


def reference_records(phase: PhaseRecipe, seed: int) -> list[dict]:
    """Every step's record as the loop made it when it read each value as soon as it was made."""
    model, processor, groups = model_and_groups()
    data = samples(processor)
    optimizer = make_optimizer(groups, phase)
    scheduler = cosine_with_warmup(optimizer, phase.max_steps, phase.warmup_ratio, phase.min_lr_ratio)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    per_epoch = len(epoch_batches(len(data), phase.batch_size, seed, 0))
    model.train()
    rows, micro = [], 0
    for step in range(1, phase.max_steps + 1):
        loss_sum, extra_sum = 0.0, {}
        for _ in range(phase.grad_accum):
            epoch, i = divmod(micro, per_epoch)
            micro += 1
            batch = collate([data[j] for j in epoch_batches(len(data), phase.batch_size, seed, epoch)[i]], 0)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], labels=batch["labels"], return_logits=False)
            extra = extra_losses(model, batch)
            loss = out.loss + sum(extra.values())
            (loss / phase.grad_accum).backward()
            loss_sum += float(loss.detach()) / phase.grad_accum
            for name, value in extra.items():
                extra_sum[name] = extra_sum.get(name, 0.0) + float(value.detach()) / phase.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, phase.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({"step": step, "epoch": round(step * phase.grad_accum / per_epoch, 4), "loss": loss_sum,
                     "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), **extra_sum})
    return rows


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_logged_records_are_the_logged_steps_values(tmp_path):
    """Bit-identical to reading each value when it was made; a log step logs its own step's
    values (not the previous step's, not a mean over the window)."""
    phase = PhaseRecipe(lr=3e-3, max_steps=7, batch_size=2, grad_accum=2, warmup_ratio=0.2, save_every=-1,
                        bf16=False)  # the reference loop below runs float32
    with one_thread():
        reference = reference_records(phase, seed=3)
        for log_every in (1, 3):
            model, processor, groups = model_and_groups()
            run = tmp_path / str(log_every)
            summary = train(model, samples(processor), groups, dataclasses.replace(phase, log_every=log_every),
                            str(run), seed=3, extra_losses=extra_losses)
            rows = logged(run)
            expected = [r for r in reference if r["step"] % log_every == 0 or r["step"] == phase.max_steps]
            assert [r["step"] for r in rows] == ([1, 2, 3, 4, 5, 6, 7] if log_every == 1 else [3, 6, 7])
            keys = ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "pixel_loss"]  # the order metrics.jsonl always had
            assert [list(r) for r in rows] == [keys] * len(rows)
            assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows] == expected
            assert summary["last"] == rows[-1]
    assert len({r["loss"] for r in reference}) == len(reference)  # every step's loss differs: a shifted log fails
    assert not (tmp_path / "1" / "profile.txt").exists()  # profile_steps=0: no profile


class Watched(torch.Tensor):
    """A tensor that counts the times its value is read by the host."""

    reads = 0
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            Watched.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_losses_are_read_only_at_log_steps(tmp_path):
    model, processor, groups = model_and_groups()
    reads = []

    def watched_loss(model, batch):
        return {"watched": model.projector[0].weight.square().mean().as_subclass(Watched)}

    Watched.reads = 0
    with one_thread():
        phase = PhaseRecipe(lr=1e-3, max_steps=7, batch_size=4, log_every=3, save_every=-1)
        train(model, samples(processor), groups, phase, str(tmp_path), extra_losses=watched_loss,
              on_step=lambda step: reads.append(Watched.reads))
    new_reads = [after - before for before, after in zip([0] + reads, reads)]
    assert [step for step, n in enumerate(new_reads, 1) if n] == [3, 6, 7]
    assert logged(tmp_path)[0]["watched"] > 0


def test_tokens_per_s_is_the_log_windows_rate(tmp_path, monkeypatch):
    """Tokens since the previous log line over the seconds since then (a clock that moves one second
    per micro-batch)."""
    model, processor, groups = model_and_groups()
    data = samples(processor)
    clock = [0.0]
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def tick(model, batch):
        clock[0] += 1.0
        return {}

    with one_thread():
        phase = PhaseRecipe(lr=1e-3, max_steps=5, batch_size=2, log_every=2, save_every=-1)
        train(model, data, groups, phase, str(tmp_path), seed=1, extra_losses=tick)
    batches = epoch_batches(len(data), 2, seed=1, epoch=0) + epoch_batches(len(data), 2, seed=1, epoch=1)
    tokens = [sum(len(data[i]["input_ids"]) for i in b) for b in batches]
    assert [(r["step"], r["tokens_per_s"]) for r in logged(tmp_path)] == [
        (2, sum(tokens[0:2]) / 2), (4, sum(tokens[2:4]) / 2), (5, tokens[4] / 1)]


def test_forward_and_backward_run_in_the_varying_shape_attention_context(tmp_path, monkeypatch):
    """Every micro-batch's forward and backward run inside model/attention_kernels.py's context for
    the training device (on a GPU: no cuDNN attention, whose plans are built per sequence length)."""
    import contextlib

    model, processor, groups = model_and_groups()
    entered, inside = [], [False]

    @contextlib.contextmanager
    def watched(device):
        entered.append(device)
        inside[0] = True
        yield
        inside[0] = False

    seen = []
    monkeypatch.setattr(trainer, "varying_shape_attention", watched)
    with one_thread():
        phase = PhaseRecipe(lr=1e-3, max_steps=3, batch_size=2, grad_accum=2, log_every=1, save_every=-1)
        train(model, samples(processor), groups, phase, str(tmp_path),
              extra_losses=lambda model, batch: seen.append(inside[0]) or {})
    assert entered == [torch.device("cpu")] * 6 and seen == [True] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_steps_on_a_gpu_run_no_cudnn_attention(tmp_path):
    """On a GPU, bf16 training steps of batches of different lengths run attention through the
    flash or memory-efficient kernel, never cuDNN's (its plans are built per length)."""
    from torch.profiler import ProfilerActivity, profile

    model, processor, groups = model_and_groups()
    model.to("cuda")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(model, samples(processor), groups, PhaseRecipe(lr=1e-3, max_steps=3, batch_size=3, save_every=-1),
              str(tmp_path), dist=trainer.single_process(torch.device("cuda")))
    names = {event.name for event in prof.events()}
    assert "aten::scaled_dot_product_attention" in names
    assert not any("cudnn_attention" in name for name in names)


def test_profile_steps_writes_the_phase_profile(tmp_path):
    model, processor, groups = model_and_groups()
    with one_thread():
        train(model, samples(processor), groups, PhaseRecipe(lr=1e-3, max_steps=6, batch_size=4, profile_steps=2,
                                                             save_every=-1), str(tmp_path))
    text = (tmp_path / "profile.txt").read_text()
    assert text.startswith("profile of 2 optimizer steps after 3 warm-up steps on cpu")
    assert "wall time per step" in text and "operators by self CPU time" in text
    parts = [line.split()[0] for line in text.splitlines()[4:8]]
    assert parts == ["data", "forward", "backward", "optimizer"]
    assert "aten::mm" in text  # the model's matrix products
    with pytest.raises(ConfigError, match="profile_steps"):
        PhaseRecipe(profile_steps=-1)


def test_a_profile_that_cannot_be_summarised_does_not_end_the_run(tmp_path, monkeypatch):
    import medmoe.training.profiling as profiling

    def broken(*args, **kwargs):
        raise AttributeError("'FunctionEventAvg' object has no attribute 'self_device_time_total'")

    monkeypatch.setattr(profiling, "report", broken)
    model, processor, groups = model_and_groups()
    with one_thread(), pytest.warns(UserWarning, match="training goes on"):
        summary = train(model, samples(processor), groups, PhaseRecipe(lr=1e-3, max_steps=6, batch_size=4,
                                                                       profile_steps=2, save_every=-1), str(tmp_path))
    assert summary["steps"] == 6
    assert "failed: AttributeError" in (tmp_path / "profile.txt").read_text()


def test_profile_report_on_a_gpu_counts_each_kernel_once():
    """The GPU path of profile.txt from stand-in events: device time per step sums the kernels' own
    rows, not the CPU op that launched them, nor a user range spanning them; a part's host time is
    its CPU row's, not its range's row on the GPU."""
    from medmoe.training.profiling import report

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, device_type, device_us, cpu_us=0.0, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                               cpu_time_total=cpu_us, is_user_annotation=annotation)

    class Averages(list):
        def table(self, sort_by, row_limit):
            return f"<table by {sort_by}, {row_limit} rows>"

    averages = Averages([event("sm90_gemm", cuda, 3000.0), event("aten::mm", cpu, 3000.0, 500.0),
                         event("forward", cpu, 0.0, 8000.0), event("forward", cuda, 9000.0, annotation=True),
                         event("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", cpu, 0.0, 1000.0)])
    text = report(averages, 2, 3, 0.5, torch.device("cuda", 0))
    assert "wall time per step: 0.2500 s" in text
    assert "device time per step: 0.0015 s" in text
    assert "data       0.0005 s" in text and "forward    0.0040 s" in text
    assert text.index("by self_device_time_total") < text.index("by self_cpu_time_total")


def test_losses_select_labelled_positions_as_the_boolean_mask_does():
    """One host sync (nonzero) instead of three, the same numbers and gradients, bit for bit."""
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (3, 9))
    labels[labels < 5] = -100
    hidden = torch.randn(3, 9, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    keep = labels[:, 1:] != -100
    old = F.cross_entropy(head(hidden[:, :-1][keep]).float(), labels[:, 1:][keep])
    (old_grad,) = torch.autograd.grad(old, hidden)
    new = labelled_positions_loss(hidden, labels, head)
    (new_grad,) = torch.autograd.grad(new, hidden)
    assert torch.equal(old, new) and torch.equal(old_grad, new_grad)
    logits = head(hidden).detach()
    old = F.cross_entropy(logits[:, :-1][keep].float(), labels[:, 1:][keep])
    assert torch.equal(causal_lm_loss(logits, labels), old)
    nothing = torch.full_like(labels, -100)
    empty = labelled_positions_loss(hidden, nothing, head)
    assert empty.item() == 0.0 and empty.requires_grad


def test_heads_loss_selects_labelled_images_as_the_boolean_mask_does():
    torch.manual_seed(0)
    features = torch.randn(6, 8, requires_grad=True)
    heads = torch.nn.ModuleDict({"organ": torch.nn.Linear(8, 3), "modality": torch.nn.Linear(8, 4)})
    targets = torch.tensor([[0, -100], [2, 1], [-100, 3], [1, -100], [-100, -100], [2, 0]], dtype=torch.float32)
    layout = {"organ": slice(0, 1), "modality": slice(1, 2)}
    loss = heads_loss(heads, layout, features, targets)
    expected = []
    for family, head in heads.items():
        t = targets[:, layout[family]]
        known = t[:, 0] != -100
        expected.append(F.cross_entropy(head(features[known]), t[known, 0].long()))
    assert torch.equal(loss, torch.stack(expected).mean())
    unlabelled = targets.clone()
    unlabelled[:, 1] = -100  # a family without a label in the batch stays in the graph at no cost
    assert torch.equal(heads_loss(heads, layout, features, unlabelled), expected[0])
