"""Engine(compile=True): the decode step through torch.compile gives the uncompiled engine's tokens,
and after `Engine.warmup` no request compiles again, whatever its batch size and length (shapes that
change become symbolic); a dense Phi step is one graph without breaks (on the CPU a Med-MoE block's
loop dispatch runs eagerly between graphs: it sizes its groups on the host). dynamo's eager backend
keeps the test fast: what is checked is the tracing, not inductor's code."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from medmoe.engine import Engine, Prompt, Request
from medmoe.engine.prepare import prepare
from medmoe.generation import SamplingConfig
from medmoe.model.pretrained import build_model

BATCHES = [[10], [10, 12, 5], [300, 20], [600, 3], [40, 700, 3]]  # prompt lengths of requests run together


@pytest.fixture
def eager_backend(monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None, mode=None: compile_(fn, dynamic=dynamic,
                                                                                          backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def requests(lengths):
    cfg = SamplingConfig(max_new_tokens=4, ignore_eos=True)
    return [Request(Prompt([3 + i % 50 for i in range(n)]), cfg) for n in lengths]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_step_compiles_at_warmup_only_and_gives_the_same_tokens(moe, eager_backend):
    torch.manual_seed(0)
    model, processor = build_model("tiny-phi")
    if moe:
        model.upcycle({"routing": "token", "expert_type": "full"})
    prepare(model.eval())  # Phi's one-token attention with a position per row, inside the compiled step
    want = [[r.token_ids for r in Engine(model, processor, max_slots=4, max_len=1024).generate(requests(b))]
            for b in BATCHES]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, processor, max_slots=4, max_len=1024, compile=True)
    engine.warmup()
    warm = counters["stats"]["unique_graphs"]
    assert 0 < warm <= (8 if moe else 4)
    got = [[r.token_ids for r in engine.generate(requests(b))] for b in BATCHES]
    assert got == want
    assert counters["stats"]["unique_graphs"] == warm  # nothing compiled in a request's path
    breaks = counters["graph_break"]
    assert not breaks if not moe else all("disable" in reason for reason in breaks)


def failing_compile(engine, err):
    """The engine's compiled step raises `err` on its first call, as a compiler that fails on it does."""
    calls = []

    def forward(rows, span):
        calls.append((rows, span))
        raise err

    engine.step_fn.forward = forward
    return calls


@pytest.mark.parametrize("err", [AssertionError("sources must not be empty for symbol s15"),
                                 RuntimeError("backend compiler failed")], ids=["dynamo-assert", "runtime"])
def test_a_compile_failure_retries_with_symbolic_shapes_then_runs_uncompiled(err, caplog, monkeypatch):
    torch.manual_seed(0)
    model, processor = build_model("tiny-phi")
    want = [r.token_ids for r in Engine(model, processor, max_slots=4).generate(requests([10, 12, 5]))]
    engine = Engine(model, processor, max_slots=4, compile=True)
    calls = failing_compile(engine, err)
    retries = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None, mode=None: retries.append(dynamic)
                        or (lambda rows, span: calls.append((rows, span)) or failing(err)))
    with caplog.at_level("WARNING", logger="medmoe.engine.decode_step"):
        got = [r.token_ids for r in engine.generate(requests([10, 12, 5]))]
    assert got == want and len(calls) == 2 and retries == [True]
    assert not engine.step_fn.compiled and engine.step_fn.forward == engine.step_fn._forward
    assert engine.stats.compile_fallbacks == 2
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "every shape symbolic" in caplog.records[0].message and "uncompiled" in caplog.records[1].message
    assert str(err) in caplog.text


def failing(err):
    raise err


def test_a_compile_that_fails_on_symbolic_recompiles_runs_compiled_with_dynamic_shapes(eager_backend):
    """The retry of a failed compile (dynamic=True, dynamo's eager backend here) gives the same tokens
    and stays compiled."""
    torch.manual_seed(0)
    model, processor = build_model("tiny-phi")
    want = [[r.token_ids for r in Engine(model, processor, max_slots=4).generate(requests(b))] for b in BATCHES[:3]]
    engine = Engine(model, processor, max_slots=4, compile=True)
    failing_compile(engine, AssertionError("sources must not be empty for symbol s15"))
    got = [[r.token_ids for r in engine.generate(requests(b))] for b in BATCHES[:3]]
    assert got == want
    assert engine.step_fn.compiled and engine.step_fn.dynamic is True and engine.stats.compile_fallbacks == 1


def wrapped_out_of_memory():
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError as oom:
        try:
            raise RuntimeError("backend compiler failed") from oom
        except RuntimeError as err:
            return err


@pytest.mark.parametrize("err", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 wrapped_out_of_memory()], ids=["oom", "oom-inside-compile"])
def test_out_of_memory_in_the_compiled_step_is_not_a_compile_failure(err):
    model, processor = build_model("tiny-phi")
    engine = Engine(model, processor, max_slots=4, compile=True)
    failing_compile(engine, err)
    with pytest.raises(type(err)) as raised:
        engine.generate(requests([10]))
    assert raised.value is err and engine.step_fn.compiled  # the engine's own handling: the requests fail
