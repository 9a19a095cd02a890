"""Classification by log-likelihood and by generation; metrics and the confusion-matrix plot."""

import numpy as np
import pytest
import torch
from PIL import Image

from medmoe.data.templates import Turn
from medmoe.evaluation.classification import (UNPARSED, choice_logprobs, choice_logprobs_batch, classification_metrics,
                                              classify_loglik,
                                              parse_choice, plot_confusion)

CHOICES = ["normal", "pneumonia"]


def grey(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB")


def test_logprobs_match_the_models_own_loss(tiny):
    model, processor = tiny
    image = grey(0)
    scores = choice_logprobs(model, processor, "Is this lung normal?", image, CHOICES + ["bacterial pneumonia"])
    assert scores.shape == (3,) and torch.all(scores < 0)
    prompt = processor.prompt("Is this lung normal?", has_image=True)
    for i, choice in enumerate(CHOICES + ["bacterial pneumonia"]):  # one at a time, no padding
        batch = processor.pad([processor.encode([Turn(prompt, answer=choice)])])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=processor.image_tensor(image)[None], labels=batch["labels"])
        n_answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
        assert scores[i].item() == pytest.approx(-out.lm_loss.item() * n_answer_tokens, rel=1e-4, abs=1e-4)
    mean = choice_logprobs(model, processor, "Is this lung normal?", image, CHOICES, reduction="mean")
    assert torch.all(mean > scores[:2])  # the mean over several tokens is less negative than the sum


def test_per_sample_routing_scores_every_choice_with_the_prompts_expert():
    """The expert comes from the prompt, as in training (pooled where there are no labels) and in
    generation: a choice's score equals the training loss of that answer."""
    from medmoe.model.pretrained import build_model

    model, processor = build_model("tiny")
    model.upcycle({"routing": "sample"})
    with torch.no_grad():
        model.router.weight.normal_(0, 0.3)  # not saturated: the pooled positions move the gate
        for block in model.moe_blocks:
            block.experts.w_in.add_(torch.randn_like(block.experts.w_in))
            block.experts.w_out.add_(torch.randn_like(block.experts.w_out))
    model.eval()
    image, question = grey(1), "Is this chest film normal, or does it show pneumonia?"
    choices = ["normal", "pneumonia of the left lower lobe with an effusion and a collapsed segment"]
    prompt = processor.prompt(question, has_image=True)
    expected = []
    for choice in choices:
        batch = processor.pad([processor.encode([Turn(prompt, answer=choice)])])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=processor.image_tensor(image)[None], labels=batch["labels"])
        expected.append(-out.lm_loss.item() * int((batch["labels"][:, 1:] != -100).sum()))
    # (pooling the answer too moves the long choice's score by about 5e-2 here)
    torch.testing.assert_close(choice_logprobs(model, processor, question, image, choices), torch.tensor(expected),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(choice_logprobs_batch(model, processor, [question], [image], choices)[0],
                               torch.tensor(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("moe", [None, "token", "sample"])
@pytest.mark.parametrize("with_images", [True, False])
def test_batched_choice_scores_equal_one_question_at_a_time(moe, with_images):
    """Left-padded rows, the output layer on the last positions only, each image encoded once:
    the same numbers as scoring each question alone, for questions and answers of unequal length."""
    from medmoe.model.pretrained import build_model

    model, processor = build_model("tiny")
    if moe:
        model.upcycle({"routing": moe})
        with torch.no_grad():
            for block in model.moe_blocks:
                block.experts.w_in.add_(torch.randn_like(block.experts.w_in) * 0.05)
    model.eval()
    questions = ["Normal?", "Is this chest film normal, or does it show pneumonia?", "Which class?"]
    images = [grey(i) for i in range(3)] if with_images else [None] * 3
    choices = CHOICES + ["bacterial pneumonia of the left lower lobe"]
    batched = choice_logprobs_batch(model, processor, questions, images, choices)
    one_by_one = torch.stack([choice_logprobs(model, processor, q, img, choices) for q, img in zip(questions, images)])
    assert batched.shape == (3, 3)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)
    assert (one_by_one[:, 0] != one_by_one[:, 1]).all()  # the scores differ, so the comparison means something


def test_classify_loglik_picks_argmax(tiny):
    model, processor = tiny
    images = [grey(i) for i in range(3)]
    preds = classify_loglik(model, processor, ["Normal or pneumonia?"] * 3, images, CHOICES)
    for img, p in zip(images, preds):
        assert p == int(choice_logprobs(model, processor, "Normal or pneumonia?", img, CHOICES).argmax())


def test_parse_choice():
    assert parse_choice("Pneumonia.", CHOICES) == 1
    assert parse_choice("The lung is normal", CHOICES) == 0
    assert parse_choice("normal or pneumonia", CHOICES) == UNPARSED  # names both
    assert parse_choice("abnormal", CHOICES) == UNPARSED              # whole words only


def test_metrics_and_plot(tmp_path):
    # true: 0 0 0 1 1; pred: 0 1 0 1 unparsed
    m = classification_metrics([0, 0, 0, 1, 1], [0, 1, 0, 1, UNPARSED], CHOICES)
    assert m["accuracy"] == 60.0
    assert m["per_class_recall"] == {"normal": pytest.approx(200 / 3), "pneumonia": 50.0}
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1]] and m["unparsed"] == 1
    plot_confusion(m, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_real_pneumoniamnist_subset(tiny):
    from conftest import shared_data

    data = np.load(shared_data("pneumoniamnist", "pneumoniamnist.npz"))
    images = [Image.fromarray(a).convert("RGB") for a in data["val_images"][:6]]
    labels = [int(v) for v in data["val_labels"][:6, 0]]
    model, processor = tiny
    preds = classify_loglik(model, processor, ["Is this chest X-ray normal or pneumonia?"] * 6, images, CHOICES)
    m = classification_metrics(labels, preds, CHOICES)
    assert m["n"] == 6 and sum(map(sum, m["confusion"])) == 6 and m["unparsed"] == 0
