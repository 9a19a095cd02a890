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
