"""Class-balanced sampling (`balanced_sampling`): weights that even out a skewed classification
set, seeded draws, and a resumed run that ends on the uninterrupted run's weights."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from train_helpers import one_thread, samples

from medmoe.errors import ConfigError, DataError
from medmoe.training import params
from medmoe.training.data import sample_weights
from medmoe.training.recipe import PhaseRecipe, load_recipe
from medmoe.training.trainer import epoch_batches, train

LABELS = ["normal", "pneumonia"]


def skewed(normal: int = 90, pneumonia: int = 10, vqa: int = 50) -> list[dict]:
    cls = [{"dataset": "pneumoniamnist", "answer": a, "choices": LABELS} for a in ["normal"] * normal + ["pneumonia"] * pneumonia]
    return cls + [{"dataset": "vqa-rad", "answer": "yes"} for _ in range(vqa)]


def drawn(records, mode: str, epochs: int = 20, seed: int = 0) -> Counter:
    weights = torch.tensor(sample_weights(records, mode))
    seen = Counter()
    for epoch in range(epochs):
        for batch in epoch_batches(len(records), 8, seed, epoch, weights=weights):
            seen.update((records[i]["dataset"], records[i]["answer"]) for i in batch)
    return seen


def test_label_balancing_evens_out_a_skewed_classification_set():
    records = skewed()
    seen = drawn(records, "label")
    normal, pneumonia = seen["pneumoniamnist", "normal"], seen["pneumoniamnist", "pneumonia"]
    assert abs(pneumonia / (normal + pneumonia) - 0.5) < 0.05  # 10% of the set, half of the draws
    # The classification set keeps its share of the epoch (100 of 150); each VQA record comes
    # exactly once per epoch, as without weights, and each rare-class image five times.
    assert (normal + pneumonia) / sum(seen.values()) == pytest.approx(100 / 150, abs=0.005)
    weights = torch.tensor(sample_weights(records, "label"))
    for epoch in range(3):
        counts = Counter(i for b in epoch_batches(len(records), 8, 0, epoch, weights=weights) for i in b)
        assert all(counts[i] == 1 for i in range(100, 150))
        assert all(counts[i] == 5 for i in range(90, 100))
        assert all(counts[i] in (0, 1) for i in range(90))
    plain = Counter()
    for epoch in range(20):
        plain.update(records[i]["answer"] for b in epoch_batches(len(records), 8, 0, epoch) for i in b)
    assert plain["pneumonia"] == 200  # without weights: each sample once per epoch


def test_dataset_balancing_and_off():
    records = skewed(normal=100, pneumonia=20, vqa=30)
    seen = drawn(records, "dataset")
    share = sum(v for (d, _), v in seen.items() if d == "vqa-rad") / sum(seen.values())
    assert abs(share - 0.5) < 0.04
    assert sample_weights(records, "off") is None
    with pytest.raises(DataError, match="balanced_sampling"):
        sample_weights(records, "classes")


def test_weighted_order_is_seeded():
    records = skewed()
    weights = torch.tensor(sample_weights(records, "label"))
    a = epoch_batches(len(records), 4, 7, 2, weights=weights)
    assert a == epoch_batches(len(records), 4, 7, 2, weights=weights)
    assert a != epoch_batches(len(records), 4, 7, 3, weights=weights)
    assert len(a) == len(epoch_batches(len(records), 4, 7, 2))  # an epoch is as long either way
    halves = [epoch_batches(len(records), 4, 7, 2, rank=r, world=2, weights=weights) for r in (0, 1)]
    assert all(len(b) == 4 for h in halves for b in h)


def test_recipe_setting():
    recipe = load_recipe("tiny", ["phase2.balanced_sampling=label"])
    assert recipe.phase2.balanced_sampling == "label" and recipe.phase3.balanced_sampling == "off"
    with pytest.raises(ConfigError, match="balanced_sampling"):
        load_recipe("tiny", ["phase2.balanced_sampling=yes"])


class Stop(Exception):
    pass


def test_weighted_run_resumes_exactly(tmp_path):
    from medmoe.model.pretrained import build_model

    weights = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]
    phase = PhaseRecipe(lr=3e-3, max_steps=6, batch_size=2, save_every=2, keep_last=3, log_every=1, warmup_ratio=0.2)

    def run(run_dir, resume=False, stop_at=None):
        torch.manual_seed(0)
        model, processor = build_model("tiny", seed=0)
        groups = params.select(model, params.phase2_groups(model))

        def stop(step):
            if step == stop_at:
                raise Stop

        with one_thread():
            try:
                train(model, samples(processor), groups, phase, str(run_dir), seed=3, resume=resume, on_step=stop,
                      weights=weights)
            except Stop:
                return None
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_at=3) is None  # checkpoint at step 2; step 3 is lost
    resumed = run(tmp_path / "b", resume=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    untrained, _ = build_model("tiny", seed=0)
    assert any(not torch.equal(v, straight[k]) for k, v in untrained.state_dict().items())
