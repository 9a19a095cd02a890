"""The training loop: overfits 8 samples; a run killed with SIGKILL and resumed ends bit-identical
to an uninterrupted one (dropout included, so the random state must be restored too); schedule,
accumulation and logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import one_thread, samples

from medmoe.training import params
from medmoe.training.checkpoint import list_checkpoints
from medmoe.training.recipe import PhaseRecipe
from medmoe.training.trainer import cosine_with_warmup, epoch_batches, train

REPO = Path(__file__).resolve().parents[1]


def test_tiny_model_overfits_8_samples(tiny, tmp_path):
    model, processor = tiny
    data = samples(processor)
    groups = params.select(model, params.phase2_groups(model))
    with one_thread():
        result = train(model, data, groups, PhaseRecipe(lr=1e-2, max_steps=60, batch_size=8, warmup_ratio=0.05,
                                                        log_every=5), str(tmp_path), seed=0)
    assert result["last"]["loss"] < 0.1
    with torch.no_grad():
        for item in data:  # greedy next-token prediction reproduces every answer token
            ids = torch.tensor([item["input_ids"]])
            labels = torch.tensor([item["labels"]])
            logits = model(input_ids=ids, pixel_values=item["pixel_values"]).logits
            keep = labels[0, 1:] != -100
            assert torch.equal(logits[0, :-1].argmax(-1)[keep], labels[0, 1:][keep])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    assert (tmp_path / "loss.png").stat().st_size > 1000


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    from train_helpers import samples
    from medmoe.model.pretrained import build_model
    from medmoe.training import params
    from medmoe.training.recipe import PhaseRecipe
    from medmoe.training.trainer import train

    run_dir, mode = sys.argv[1], sys.argv[2]
    model, processor = build_model("tiny", seed=0)
    # Dropout on the projector's output draws from the torch generator at every step: a resume
    # that does not restore the random state ends on different weights.
    model.projector.register_forward_hook(lambda mod, args, out: torch.nn.functional.dropout(out, 0.3, mod.training))
    groups = params.select(model, params.phase2_groups(model))
    phase = PhaseRecipe(lr=3e-3, max_steps=8, batch_size=2, grad_accum=2, save_every=2, keep_last=2, log_every=1,
                        warmup_ratio=0.25)

    def kill_mid_way(step):
        if mode == "kill" and step == 5:  # checkpoint at step 4 exists; step 5 is lost
            os.kill(os.getpid(), signal.SIGKILL)

    # 8 samples, 2 per micro-batch, 2 micro-batches per step: 2 steps per epoch, 4 epochs in all.
    train(model, samples(processor), groups, phase, run_dir, seed=3, resume=(mode == "resume"), on_step=kill_mid_way)
    model.save_pretrained(os.path.join(run_dir, "final"))
""")


def _run(script, run_dir, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), str(run_dir), mode, str(REPO / "tests")], env=env,
                          capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    done = _run(script, straight, "plain")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = _run(script, broken, "kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [Path(p).name for p in list_checkpoints(str(broken))] == ["step-00000002", "step-00000004"]
    assert not (broken / "final").exists()
    resumed = _run(script, broken, "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout + resumed.stderr

    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
        changed += key.startswith("language_model.")
    assert changed
    # The log of the resumed run is the uninterrupted run's log (step 5 is not counted twice).
    steps = [json.loads(line)["step"] for line in open(broken / "metrics.jsonl")]
    assert steps == list(range(1, 9))
    losses = [json.loads(line)["loss"] for line in open(straight / "metrics.jsonl")]
    assert losses == [json.loads(line)["loss"] for line in open(broken / "metrics.jsonl")]
    assert [Path(p).name for p in list_checkpoints(str(broken))] == ["step-00000006", "step-00000008"]


def test_data_order_is_seeded_and_sharded():
    a = epoch_batches(10, 2, seed=0, epoch=0)
    assert a == epoch_batches(10, 2, seed=0, epoch=0) and a != epoch_batches(10, 2, seed=0, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    r0 = epoch_batches(10, 2, seed=0, epoch=0, rank=0, world=2)
    r1 = epoch_batches(10, 2, seed=0, epoch=0, rank=1, world=2)
    assert len(r0) == len(r1) == 2  # the incomplete last global batch is dropped on every rank
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_cosine_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] < 0.05


def test_per_group_learning_rates(tiny, tmp_path):
    model, processor = tiny
    groups = params.select(model, params.phase2_groups(model))
    with one_thread():
        train(model, samples(processor, 4), groups, PhaseRecipe(lr=1e-3, lr_groups={"projector": 1e-2}, max_steps=1,
                                                                batch_size=4, warmup_ratio=0), str(tmp_path))
    ckpt = list_checkpoints(str(tmp_path))[-1]
    groups_state = json.load(open(os.path.join(ckpt, "state.json")))["param_groups"]
    assert {g["name"]: g["initial_lr"] for g in groups_state} == {"llm": 1e-3, "projector": 1e-2}


def test_gradient_accumulation_matches_a_big_batch(tiny, tmp_path):
    """Two micro-batches of 4 with accumulation give the same step as one batch of 8 (same data)."""
    from medmoe.model.pretrained import build_model

    results = []
    for bs, accum in ((8, 1), (4, 2)):
        model, processor = build_model("tiny", seed=0)
        data = [dict(s, input_ids=s["input_ids"][:18], labels=s["labels"][:18]) for s in samples(processor)]
        groups = params.select(model, params.phase1_groups(model))
        with one_thread():
            train(model, data, groups, PhaseRecipe(lr=1e-2, max_steps=1, batch_size=bs, grad_accum=accum,
                                                   warmup_ratio=0, grad_clip=0, bf16=False),  # exact float32 sums
                  str(tmp_path / f"{bs}"), seed=0)
        results.append(model.projector[0].weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    from medmoe.model.pretrained import build_model
    from medmoe.moe import decoder_layers

    def active(model):
        llm = model.language_model
        if any("forward" in vars(layer.mlp) for layer in decoder_layers(llm)):
            return True  # "activations": the FFNs run with their activations recomputed
        if hasattr(type(llm), "is_activation_checkpointing"):  # transformers >= 5.24
            return llm.is_activation_checkpointing
        return llm.is_gradient_checkpointing

    results = []
    for checkpointing in ("off", "full", "selective", "activations"):
        model, processor = build_model("tiny", seed=0)
        groups = params.select(model, params.phase2_groups(model))
        seen = []
        with one_thread():
            train(model, samples(processor, 4), groups, PhaseRecipe(lr=1e-2, max_steps=2, batch_size=4, warmup_ratio=0,
                                                                    grad_checkpointing=checkpointing),
                  str(tmp_path / str(checkpointing)), seed=0, on_step=lambda step: seen.append(active(model)))
        assert seen == [checkpointing != "off"] * 2
        assert not active(model)  # switched off again after the phase
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(results[0][key], other[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_with_tied_weights_and_frozen_batch_norm_resumes(tmp_path):
    """Saved states hold buffers and tied aliases besides the trained parameters: resuming must
    accept them, and still refuse a checkpoint whose trained parameters differ."""
    from medmoe.errors import CheckpointError
    from medmoe.training.checkpoint import load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        net = torch.nn.Module()
        net.embed, net.norm, net.proj = torch.nn.Embedding(10, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4)
        net.head = torch.nn.Linear(4, 10, bias=False)
        net.head.weight = net.embed.weight  # tied, frozen
        for p in (*net.embed.parameters(), *net.norm.parameters()):
            p.requires_grad_(False)
        return net

    def optimizer_of(net):
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    net = build()
    opt, sched = optimizer_of(net)
    net.proj(net.norm(net.embed(torch.arange(6)))).sum().backward()  # batch norm statistics move
    opt.step()
    path = save_checkpoint(str(tmp_path), 1, net, opt, sched, {"micro_batch": 1}, {})
    again = build()
    load_checkpoint(path, again, *optimizer_of(again))
    assert torch.equal(again.proj.weight, net.proj.weight)
    assert torch.equal(again.norm.running_mean, net.norm.running_mean)
    # A trained parameter that gets no gradient (EfficientNet's unused classifier) has no optimizer state.
    net.unused, again.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    opt, sched = optimizer_of(net)
    net.proj(net.norm(net.embed(torch.arange(6)))).sum().backward()
    opt.step()
    path = save_checkpoint(str(tmp_path), 2, net, opt, sched, {"micro_batch": 2}, {})
    opt_again = optimizer_of(again)
    load_checkpoint(path, again, *opt_again)
    assert torch.equal(opt_again[0].state[again.proj.weight]["exp_avg"], opt.state[net.proj.weight]["exp_avg"])
    assert torch.equal(again.unused.weight, net.unused.weight)
    other = build()
    other.norm.weight.requires_grad_(True)
    with pytest.raises(CheckpointError, match="differ"):
        load_checkpoint(path, other, *optimizer_of(other))


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_autocast_on_a_cpu_only_with_bfloat16_hardware(tiny, tmp_path, monkeypatch, fast_bf16):
    """`bf16=true` autocasts a CPU step where the CPU multiplies bfloat16 in hardware (about 1.8x
    faster fine-tuning there) and leaves it float32 elsewhere; the weights stay float32 either way."""
    from medmoe.training import trainer

    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: fast_bf16)
    cpu = torch.device("cpu")
    with trainer.autocast_context(trainer.autocast_dtype(True, cpu), cpu)():
        assert torch.is_autocast_enabled("cpu") == fast_bf16
        x = torch.randn(4, 8)
        assert (x @ x.T).dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    with trainer.autocast_context(trainer.autocast_dtype(False, cpu), cpu)():
        assert not torch.is_autocast_enabled("cpu")

    model, processor = tiny
    groups = params.select(model, params.phase2_groups(model))
    with one_thread():
        result = train(model, samples(processor), groups, PhaseRecipe(lr=1e-2, max_steps=20, batch_size=8,
                                                                     log_every=5), str(tmp_path), seed=0)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert result["last"]["loss"] < 0.8 * rows[0]["loss"]  # it learns
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_decoder_layers_train_as_the_eager_ones(tmp_path):
    """`compile=true`: the same losses step by step (fused kernels round differently, so close, not
    equal) and the parameters under their own names."""
    from medmoe.model.pretrained import build_model

    losses, names = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model, processor = build_model("tiny")
        groups = params.select(model, params.phase2_groups(model))
        out = tmp_path / str(compiled)
        with one_thread():
            train(model, samples(processor), groups, PhaseRecipe(lr=1e-2, max_steps=4, batch_size=4, log_every=1,
                                                                 compile=compiled), str(out), seed=0)
        losses[compiled] = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
        names[compiled] = list(model.state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-3) and len(losses[True]) == 4
    assert names[True] == names[False]


def test_a_compiler_failure_names_the_setting_that_turns_it_off(tiny, tmp_path, monkeypatch):
    from torch._dynamo.exc import Unsupported

    from medmoe.errors import ConfigError
    from medmoe.moe.upcycle import decoder_layers
    from medmoe.training import trainer

    model, processor = tiny

    def broken(model) -> int:  # as if the compiler met something it cannot trace
        def fail(*args, **kwargs):
            raise Unsupported("an op the compiler cannot trace")
        for layer in decoder_layers(model.language_model):
            monkeypatch.setattr(layer, "forward", fail)
        return 1

    monkeypatch.setattr(trainer, "compile_decoder_layers", broken)
    groups = params.select(model, params.phase2_groups(model))
    with pytest.raises(ConfigError, match="compile=false"):
        train(model, samples(processor), groups, PhaseRecipe(max_steps=2, batch_size=4, compile=True), str(tmp_path))
