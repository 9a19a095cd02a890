"""The generation loop of a batch: every row runs until it ends, whatever the others do."""

import importlib

import torch
from PIL import Image

from medmoe.generation import SamplingConfig, run_generation

generation = importlib.import_module("medmoe.generation.generate")  # the package exports a function of that name


def scripted(monkeypatch, rows: list[list[int]]):
    """Replace the next-token choice by a script (row r's step-t token is rows[r][t]), so that rows
    of one batch end at chosen steps; the tiny model still runs every step on what was chosen."""
    steps = []

    def pick_next(logits, cfg, generator):
        t = len(steps)
        steps.append(logits.shape[0])
        return torch.tensor([row[min(t, len(row) - 1)] for row in rows], device=logits.device)

    monkeypatch.setattr(generation, "pick_next", pick_next)
    return steps


def test_every_row_runs_until_it_ends_not_until_the_first_one_does(tiny, monkeypatch):
    model, processor = tiny
    eos = min(generation.eos_ids(model, processor))
    rows = [[40, 41, eos], [50, 51, 52, 53, 54, eos], [60, eos]]
    steps = scripted(monkeypatch, rows)
    questions = ["short", "a much longer question here", "why?"]
    images = [Image.new("RGB", (40, 28), (120, 30, 60)), None, Image.new("RGB", (40, 28), (3, 200, 9))]
    out = run_generation(model, processor, questions, images, SamplingConfig(max_new_tokens=20))
    assert out.token_ids == [[40, 41], [50, 51, 52, 53, 54], [60]]
    assert out.finish_reasons == ["eos", "eos", "eos"]
    assert len(steps) == 6  # and no step after the last row has ended
    assert out.texts == [processor.decode(ids).strip() for ids in out.token_ids]


def test_rows_that_reach_the_token_limit_end_there_while_others_end_earlier(tiny, monkeypatch):
    model, processor = tiny
    eos = min(generation.eos_ids(model, processor))
    scripted(monkeypatch, [[70, eos], [80, 81, 82, 83, 84, 85, 86, eos]])
    out = run_generation(model, processor, ["one", "two words"], None, SamplingConfig(max_new_tokens=4))
    assert out.token_ids == [[70], [80, 81, 82, 83]]
    assert out.finish_reasons == ["eos", "length"]


def test_a_stop_string_in_one_row_does_not_end_the_others(tiny, monkeypatch):
    model, processor = tiny
    eos = min(generation.eos_ids(model, processor))
    a, b = processor.tokenizer.encode("ab", add_special_tokens=False), processor.tokenizer.encode("cdefg", add_special_tokens=False)
    scripted(monkeypatch, [a + [eos], b + [eos]])
    out = run_generation(model, processor, ["one", "two"], None, SamplingConfig(max_new_tokens=20, stop=("b",)))
    assert out.texts == ["a", "cdefg"]
    assert out.finish_reasons == ["stop", "eos"]
