"""The Python API:

    from medmoe import MedMoE
    m = MedMoE.load("path/to/model")
    answer = m.ask("chest.dcm", "Which organ is abnormal?")   # Answer(text, routing, ...)
    answers = m.ask_batch(["a.png", "b.png"], ["What modality?", "Is there a fracture?"])
    label = m.classify("xray.png", ["normal", "pneumonia"])   # Classification(label, probabilities, ...)
    chat = m.chat(); chat.ask("What is shown?", image="ct.nii.gz"); chat.ask("Where exactly?")

Every answer carries a routing summary: over the image tokens of the prompt, which domain expert
the router chose (top-1) in each MoE layer, and the majority over all layers. That tells which
expert "handled the image" (the paper's CT / MRI / X-Ray / Pathology experts).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..config import IMAGE_TOKEN
from ..data.templates import Turn
from ..errors import ConfigError, DataError
from ..engine import Request, Result, as_generation_output, encode_conversation, shared_engine
from ..generation import GenerationOutput, SamplingConfig


# --- routing summary --------------------------------------------------------------------------

@dataclass
class Routing:
    expert: str | None  # the majority top-1 expert over image tokens and MoE layers (None: no image / dense model)
    shares: dict[str, float]  # fraction of (image token, layer) top-1 choices per expert
    layers: list[dict] = field(default_factory=list)  # [{"layer": i, "counts": {expert: n}, "expert": name}]
    image_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def bar(self, width: int = 30) -> str:
        """One line for a terminal: 'CT ######....  62%  MRI ##... 21% ...'."""
        parts = []
        for name, share in self.shares.items():
            n = round(share * width)
            parts.append(f"{name:<10} {'#' * n}{'.' * (width - n)} {share:4.0%}")
        return "\n".join(parts)


def expert_names(model) -> list[str]:
    moe = model.config.moe_config
    names = list(moe.modalities)[: moe.num_experts]
    return names + [f"expert{i}" for i in range(len(names), moe.num_experts)]


def routing_summaries(model, output: GenerationOutput) -> list[Routing | None]:
    """Per row of a generated batch: the routing of its image tokens (None when there are none)."""
    if not output.prompt_routing:
        return [None] * output.input_ids.shape[0]
    names = expert_names(model)
    image_positions = output.input_ids == model.config.image_token_id  # [B, S]
    summaries: list[Routing | None] = []
    for row in range(image_positions.shape[0]):
        where = image_positions[row].nonzero().squeeze(-1)
        if where.numel() == 0:
            summaries.append(None)
            continue
        total: Counter = Counter()
        layers = []
        # One copy to the host for all layers (the engine's thread calls this as a request ends).
        tops = torch.stack([record.expert_index[row, :, 0] for record in output.prompt_routing]).cpu()[:, where.cpu()]
        for record, top1 in zip(output.prompt_routing, tops):
            counts = Counter({names[int(i)]: int(c) for i, c in zip(*[t.tolist() for t in top1.unique(return_counts=True)])})
            total.update(counts)
            layers.append({"layer": record.layer, "counts": {n: counts.get(n, 0) for n in names},
                           "expert": counts.most_common(1)[0][0]})
        n_total = sum(total.values())
        shares = {n: total.get(n, 0) / n_total for n in names}
        summaries.append(Routing(total.most_common(1)[0][0], shares, layers, int(where.numel())))
    return summaries


# --- answers ----------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    routing: Routing | None
    finish_reason: str = "length"  # "eos", "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list | None = None  # engine.TokenLogprob per answer token, when asked for (SamplingConfig.logprobs)
    confidence: float | None = None  # in [0, 1], how the model rates its answer (docs/serving.md)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["routing"] = self.routing.to_dict() if self.routing else None
        return d

    def withheld(self, min_confidence: float | None) -> bool:
        """True where a deployment abstains: a threshold is set and the answer's confidence is below it
        (`medmoe eval` reports the accuracy each threshold keeps; docs/serving.md, "Confidence")."""
        return min_confidence is not None and (self.confidence is None or self.confidence < min_confidence)

    def __str__(self) -> str:
        return self.text


@dataclass
class Classification:
    """The label the model finds likeliest for an image, among the labels offered."""
    label: str
    probabilities: dict[str, float]  # label -> probability (summing to 1), calibrated unless asked not to
    uncalibrated: dict[str, float]  # the label likelihoods as the model gives them
    question: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.label


def classify_image(model, processor, image, labels: Sequence[str], question: str | None = None,
                   calibrate: bool = True) -> Classification:
    """The likeliest of `labels` for the image, by each label's log-likelihood as the answer
    (every answer is one of the labels). `calibrate`: divide out the label distribution the model
    gives the same question without the image (contextual calibration), so that a lean the
    question's words alone give (PneumoniaMNIST: "pneumonia") does not decide; needs no data
    (docs/evaluation.md, "loglik_contextual")."""
    from ..evaluation.classification import choice_logprobs, contextual_calibrated

    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) < len(labels):
        raise DataError(f"classify needs at least two distinct labels, got {labels}")
    question = question or f"Which class does this image belong to? Options: {', '.join(labels)}."
    scores = choice_logprobs(model, processor, question, image, labels)
    raw = scores.double().log_softmax(-1)
    probs = raw
    if calibrate and image is not None:
        alone = choice_logprobs(model, processor, question, None, labels)
        probs = contextual_calibrated(scores[None], alone[None])[0]
    as_dict = lambda logp: {label: float(p) for label, p in zip(labels, logp.exp())}
    return Classification(labels[int(probs.argmax())], as_dict(probs), as_dict(raw), question)


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def conversation_requests(processor, conversations: Sequence[list[Turn]], images: Sequence[list],
                          cfg: SamplingConfig, on_text: Callable[[int, str], None] | None = None) -> list[Request]:
    """Engine requests for conversations (the last turn unanswered), with routing records.
    `on_text(row, delta)` receives each conversation's text as it is produced."""
    requests = []
    for row, (turns, imgs) in enumerate(zip(conversations, images)):
        callback = None
        if on_text is not None:
            def callback(delta, row=row):
                if delta.text:
                    on_text(row, delta.text)
        requests.append(Request(encode_conversation(processor, list(turns), list(imgs)), cfg, output_routing=True,
                                on_delta=callback))
    return requests


def answers_from(model, results: list[Result], pad_id: int = 0) -> list[Answer]:
    """Answers with routing summaries from the engine's results."""
    summaries = routing_summaries(model, as_generation_output(results, pad_id))
    return [Answer(r.text, routing, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.logprobs, r.confidence)
            for r, routing in zip(results, summaries)]


def generate_conversations(model, processor, conversations: Sequence[list[Turn]], images: Sequence[list],
                           cfg: SamplingConfig, on_text: Callable[[int, str], None] | None = None,
                           engine=None) -> list[Answer]:
    """Answers for a batch of conversations through the engine (the model's shared one by default),
    with routing summaries."""
    engine = engine or shared_engine(model, processor)
    results = engine.generate(conversation_requests(processor, conversations, images, cfg, on_text))
    return answers_from(model, results, engine.pad_id)


# --- loading ----------------------------------------------------------------------------------

def load_model(path: str, device: str | None = None, dtype: str | torch.dtype | None = None,
               quantize: str | None = None):
    """(model, processor) from a model folder, on the chosen device and dtype, optionally int8."""
    from ..loading import load_for_inference

    model, processor = load_for_inference(path, device, dtype)
    if quantize not in (None, "none"):
        if quantize != "int8":
            raise ConfigError(f"--quantize {quantize!r}: use int8 or none")
        from .quantize import quantize_int8

        quantize_int8(model)
    return model, processor


class MedMoE:
    """A loaded model with a processor: ask about images, one at a time, in batches, or in a chat."""

    def __init__(self, model, processor, max_new_tokens: int = 128, engine=None):
        self.model, self.processor = model, processor
        self.max_new_tokens = max_new_tokens
        self._engine = engine

    @property
    def engine(self):
        """The inference engine every answer runs through (medmoe.engine)."""
        if self._engine is None:
            self._engine = shared_engine(self.model, self.processor)
        return self._engine

    @classmethod
    def load(cls, path: str, device: str | None = None, dtype: str | None = None, quantize: str | None = None,
             max_new_tokens: int = 128) -> "MedMoE":
        model, processor = load_model(path, device, dtype, quantize)
        return cls(model, processor, max_new_tokens)

    def config(self, max_new_tokens: int | None = None, **sampling) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=max_new_tokens or self.max_new_tokens, **sampling)

    def ask(self, image, question: str, max_new_tokens: int | None = None, **sampling) -> Answer:
        """Answer one question about one image (path, bytes, PIL, DICOM, NIfTI) or None."""
        return self.ask_batch([image], [question], max_new_tokens, **sampling)[0]

    def ask_batch(self, images: Sequence, questions: Sequence[str], max_new_tokens: int | None = None,
                  **sampling) -> list[Answer]:
        """Answers for many (image, question) pairs in one batched generation."""
        if len(images) != len(questions):
            raise DataError(f"{len(questions)} questions but {len(images)} images")
        return generate_conversations(self.model, self.processor, [[Turn(q)] for q in questions],
                                      [_as_list(i) for i in images], self.config(max_new_tokens, **sampling),
                                      engine=self.engine)

    def classify(self, image, labels: Sequence[str], question: str | None = None,
                 calibrate: bool = True) -> Classification:
        """The likeliest of `labels` for the image (`classify_image`)."""
        return classify_image(self.model, self.processor, image, labels, question, calibrate)

    def stream(self, image, question: str, max_new_tokens: int | None = None, **sampling) -> Iterator[str]:
        """Yield the answer piece by piece."""
        yield from self.chat().stream(question, image, max_new_tokens, **sampling)

    def chat(self) -> "ChatSession":
        return ChatSession(self)


class ChatSession:
    """A multi-turn conversation: each question sees the earlier turns (and their images)."""

    def __init__(self, medmoe: MedMoE):
        self.medmoe = medmoe
        self.turns: list[Turn] = []
        self.images: list = []
        self.last: Answer | None = None

    def _question(self, question: str, image) -> tuple[list[Turn], list]:
        images = self.images + _as_list(image)
        if image is not None and IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n{question}"
        return self.turns + [Turn(question)], images

    def ask(self, question: str, image=None, max_new_tokens: int | None = None, **sampling) -> Answer:
        turns, images, handle = self._submit(question, image, max_new_tokens, **sampling)
        return self._finish(turns, images, self._answer(handle))

    def stream(self, question: str, image=None, max_new_tokens: int | None = None, **sampling) -> Iterator[str]:
        """Yield the answer as it is produced; `self.last` holds the whole Answer afterwards."""
        turns, images, handle = self._submit(question, image, max_new_tokens, **sampling)
        try:
            for delta in handle:
                if delta.text:
                    yield delta.text
        finally:
            handle.cancel()  # the caller stopped reading: stop generating (no-op once finished)
        self._finish(turns, images, self._answer(handle))

    def _submit(self, question, image, max_new_tokens, **sampling):
        turns, images = self._question(question, image)
        m = self.medmoe
        request = conversation_requests(m.processor, [turns], [images], m.config(max_new_tokens, **sampling))[0]
        return turns, images, m.engine.submit(request)

    def _answer(self, handle) -> Answer:
        m = self.medmoe
        return answers_from(m.model, [handle.result()], m.engine.pad_id)[0]

    def _finish(self, turns, images, answer: Answer) -> Answer:
        turns[-1] = Turn(turns[-1].question, answer.text)
        self.turns, self.images, self.last = turns, images, answer
        return answer

    def reset(self) -> None:
        self.turns, self.images, self.last = [], [], None
