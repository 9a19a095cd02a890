"""Routing counts per modality and token kind, router modality accuracy, the heatmap."""

import pytest
import torch

from medmoe.evaluation.routing import RoutingStats, plot_routing
from medmoe.moe.block import LayerRouting

IMG = 99


def routing_for(choices: list[list[int]], layers=(0, 2)) -> list[LayerRouting]:
    """The same per-token top-1 choices in every layer; choices [B][S]."""
    idx = torch.tensor(choices)[..., None]
    probs = torch.nn.functional.one_hot(idx[..., 0], 4).float()
    return [LayerRouting(layer=l, expert_index=idx, probs=probs) for l in layers]


def test_counts_and_accuracy_by_hand(tmp_path):
    # sample 0 (CT = expert 0): pad, 3 image tokens routed 0,0,1, 1 text token routed 3
    # sample 1 (MRI = expert 1): 3 image tokens routed 2,2,1, 2 text tokens routed 1,1
    ids = torch.tensor([[0, IMG, IMG, IMG, 5], [IMG, IMG, IMG, 6, 7]])
    valid = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    stats = RoutingStats()
    stats.add(routing_for([[3, 0, 0, 1, 3], [2, 2, 1, 1, 1]]), ids, valid, IMG, ["CT", "MRI"])
    assert stats.counts[("image", "CT")].tolist() == [[2, 1, 0, 0]] * 2  # per layer (0 and 2)
    assert stats.counts[("text", "CT")].tolist() == [[0, 0, 0, 1]] * 2   # the padding's choice (3) not counted
    assert stats.counts[("image", "MRI")].tolist() == [[0, 1, 2, 0]] * 2
    acc = stats.router_accuracy()
    # tokens: CT 2 of 3 right, MRI 1 of 3 (per layer, both layers alike) -> 3/6; samples: CT majority 0 right, MRI majority 2 wrong
    assert acc["token_accuracy"] == 50.0 and acc["sample_accuracy"] == 50.0
    assert acc["per_modality"] == {"CT": 100.0, "MRI": 0.0}
    shares = stats.summary()["shares"]
    assert shares["image"]["CT"][0] == pytest.approx([200 / 3, 100 / 3, 0, 0])
    assert plot_routing(stats.summary(), tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_unknown_modality_not_scored():
    stats = RoutingStats()
    stats.add(routing_for([[0, 0]]), torch.tensor([[IMG, 5]]), torch.ones(1, 2), IMG, ["unknown"])
    assert stats.router_accuracy()["samples"] == 0
    assert ("image", "unknown") in stats.counts


def test_dense_model_has_nothing_to_plot(tmp_path):
    stats = RoutingStats()
    stats.add(None, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), IMG, ["CT"])
    assert not plot_routing(stats.summary(), tmp_path / "r.png")


def test_tiny_moe_model_routing(tiny):
    model, processor = tiny
    model.upcycle()
    from PIL import Image

    batch = processor(["What is this?", "Which organ is shown here?"], [Image.new("RGB", (32, 32), "gray")] * 2)
    out = model(**batch, output_routing=True)
    stats = RoutingStats()
    stats.add(out.routing, batch["input_ids"], batch["attention_mask"], model.config.image_token_id, ["CT", "X-Ray"])
    n_image = processor.num_image_tokens
    total_image = sum(stats.counts[("image", m)].sum().item() for m in ("CT", "X-Ray"))
    k = model.config.moe_config.top_k
    assert total_image == 2 * n_image * len(out.routing) * k
    n_text = int(batch["attention_mask"].sum()) - 2 * n_image
    assert sum(stats.counts[("text", m)].sum().item() for m in ("CT", "X-Ray")) == n_text * len(out.routing) * k
    assert stats.summary()["layers"] == [r.layer for r in out.routing]


def test_one_prompts_counts_equal_those_of_its_row_in_a_padded_batch():
    """evaluation/routing.py: `prompt_counts` (an engine result's own records) against
    `sample_counts` (a left-padded batch), on random choices."""
    from medmoe.evaluation.routing import prompt_counts, sample_counts
    from medmoe.moe import LayerRouting

    torch.manual_seed(0)
    image_id, lengths, width = 7, [9, 6], 9
    ids = torch.randint(0, 6, (2, width))
    ids[:, 2:5] = image_id
    valid = torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]
    routing = [LayerRouting(layer, torch.randint(0, 4, (2, width, 2)), torch.rand(2, width, 4)) for layer in (1, 3, 5)]
    batch = sample_counts(routing, ids, valid, image_id)
    for row, n in enumerate(lengths):
        own = [LayerRouting(r.layer, r.expert_index[row:row + 1, width - n:], r.probs[row:row + 1, width - n:])
               for r in routing]
        assert prompt_counts(own, ids[row, width - n:].tolist(), image_id) == batch[row]
    assert sum(map(sum, batch[0]["image"])) == 3 * 3 * 2  # 3 image tokens, 3 layers, top-2
