"""Small shared pieces for the training tests: a tiny model and 8 short samples."""

from __future__ import annotations

import contextlib

import torch

ANSWERS = ["yes", "no", "left lung", "brain", "ct scan", "liver", "x-ray", "kidney"]


@contextlib.contextmanager
def one_thread():
    """Tiny models are fastest (and reproducible) on one thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def samples(processor, n: int = 8, seed: int = 1) -> list[dict]:
    """n short samples: a random image and a short answer (plain template: <image> + answer)."""
    from medmoe.data.templates import Turn

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        enc = processor.encode([Turn("<image>", ANSWERS[i % len(ANSWERS)])], template="plain")
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, "id": str(i),
                    "pixel_values": torch.randn(1, 3, 32, 32, generator=g)})
    return out


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def phase1_run(folder, overrides: list[str], stop_at: int | None = None, resume: bool = False):
    """Phase 1 of the tiny recipe into folder/phase1 (4 steps on the sample's captions twice, a
    checkpoint every 2, every step logged), `overrides` last; stopped after step `stop_at` as an
    interrupted run would be, or resumed. Returns the phase folder."""
    from medmoe.training.phases import run_phase
    from medmoe.training.recipe import load_recipe

    recipe = load_recipe("tiny", [f"output_dir={folder}", "phase1.max_steps=4", "phase1.save_every=2",
                                  "phase1.log_every=1", 'phase1.data=["captions:sample*2"]', *overrides])

    def stop(step):
        if step == stop_at:
            raise KeyboardInterrupt

    with one_thread():
        try:
            run_phase(recipe, "1", resume=resume, on_step=stop)
        except KeyboardInterrupt:
            pass
    return folder / "phase1"


def logged(run) -> list[dict]:
    """Every value metrics.jsonl logged, but the speed."""
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def resumes_exactly(tmp_path, overrides: list[str]):
    """Phase 1 run whole, and again stopped after step 2 and resumed: both must log the same values
    and end on the same weights. Returns the whole run's folder and its logged rows."""
    from safetensors.torch import load_file

    whole = phase1_run(tmp_path / "whole", overrides)
    phase1_run(tmp_path / "broken", overrides, stop_at=2)
    assert not (tmp_path / "broken" / "phase1" / "model").exists()
    broken = phase1_run(tmp_path / "broken", overrides, resume=True)
    rows = logged(whole)
    assert logged(broken) == rows
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return whole, rows
