"""Engine(compile=True): the decode step through torch.compile gives the uncompiled engine's tokens,
without graph breaks, and after `Engine.warmup` no request compiles again, whatever its batch size
and length (shapes that change become symbolic). dynamo's eager backend keeps the test fast: what
is checked is the tracing, not inductor's code."""

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


def test_compiled_step_compiles_at_warmup_only_and_gives_the_same_tokens(eager_backend):
    torch.manual_seed(0)
    model, processor = build_model("tiny-phi")
    prepare(model.eval())  # Phi's one-token attention with a position per row, inside the compiled step
    want = [[r.token_ids for r in Engine(model, processor, max_slots=4, max_len=1024).generate(requests(b))]
            for b in BATCHES]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, processor, max_slots=4, max_len=1024, compile=True)
    engine.warmup()
    warm = counters["stats"]["unique_graphs"]
    assert 0 < warm <= 4
    got = [[r.token_ids for r in engine.generate(requests(b))] for b in BATCHES]
    assert got == want
    assert counters["stats"]["unique_graphs"] == warm  # nothing compiled in a request's path
    assert not counters["graph_break"]
