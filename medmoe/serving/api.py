"""The Python API:

    from medmoe import MedMoE
    m = MedMoE.load("path/to/model")
    answer = m.ask("chest.dcm", "Which organ is abnormal?")   # Answer(text, routing, ...)
    answers = m.ask_batch(["a.png", "b.png"], ["What modality?", "Is there a fracture?"])
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
from ..data.images import load_image
from ..data.templates import Turn
from ..errors import ConfigError, DataError
from ..generation import GenerationOutput, SamplingConfig, run_generation


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
        for record in output.prompt_routing:
            top1 = record.expert_index[row, :, 0].to("cpu")[where.cpu()]
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["routing"] = self.routing.to_dict() if self.routing else None
        return d

    def __str__(self) -> str:
        return self.text


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def conversation_batch(processor, conversations: Sequence[list[Turn]], images: Sequence[list]) -> dict:
    """Left-padded generation inputs for multi-turn conversations (the last turn unanswered).

    images[i] are conversation i's images in the order of their `<image>` placeholders; when there
    is exactly one image and no placeholder, it goes in front of the first question (the paper's prompt).
    """
    encoded, pixels = [], []
    for turns, imgs in zip(conversations, images):
        imgs = [load_image(i) for i in imgs]
        placeholders = sum(t.question.count(IMAGE_TOKEN) for t in turns)
        if len(imgs) == 1 and placeholders == 0:
            turns = [Turn(processor.prompt(turns[0].question, True), turns[0].answer)] + list(turns[1:])
            placeholders = 1
        if placeholders != len(imgs):
            raise DataError(f"the conversation has {placeholders} {IMAGE_TOKEN} placeholders but {len(imgs)} images")
        encoded.append(processor.encode(list(turns)))
        pixels.extend(processor.image_tensor(i) for i in imgs)
    batch = processor.pad(encoded, padding_side="left")
    batch.pop("labels")
    batch["pixel_values"] = torch.stack(pixels) if pixels else None
    return batch


def generate_conversations(model, processor, conversations: Sequence[list[Turn]], images: Sequence[list],
                           cfg: SamplingConfig, on_text: Callable[[int, str], None] | None = None) -> list[Answer]:
    """Answers for a batch of conversations in one generation pass, with routing summaries."""
    batch = conversation_batch(processor, conversations, images)
    out = run_generation(model, processor, [], None, cfg, output_routing=True, on_text=on_text, batch=batch)
    summaries = routing_summaries(model, out)
    prompt_lengths = batch["attention_mask"].sum(-1).tolist()
    return [Answer(text, routing, reason, int(n), len(tokens))
            for text, routing, reason, n, tokens in zip(out.texts, summaries, out.finish_reasons,
                                                         prompt_lengths, out.token_ids)]


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

    def __init__(self, model, processor, max_new_tokens: int = 128):
        self.model, self.processor = model, processor
        self.max_new_tokens = max_new_tokens

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
                                      [_as_list(i) for i in images], self.config(max_new_tokens, **sampling))

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
        return self._finish(*self._run(question, image, None, max_new_tokens, **sampling))

    def stream(self, question: str, image=None, max_new_tokens: int | None = None, **sampling) -> Iterator[str]:
        """Yield the answer as it is produced; `self.last` holds the whole Answer afterwards.

        Generation runs in a worker thread so pieces reach the caller while tokens are produced."""
        import queue
        import threading

        pieces: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                result["value"] = self._run(question, image, lambda row, delta: pieces.put(delta),
                                            max_new_tokens, **sampling)
            except BaseException as err:  # handed to the caller's thread below
                result["error"] = err
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (piece := pieces.get()) is not None:
            yield piece
        if "error" in result:
            raise result["error"]
        self._finish(*result["value"])

    def _run(self, question, image, on_text, max_new_tokens, **sampling):
        turns, images = self._question(question, image)
        m = self.medmoe
        answer = generate_conversations(m.model, m.processor, [turns], [images],
                                        m.config(max_new_tokens, **sampling), on_text)[0]
        return turns, images, answer

    def _finish(self, turns, images, answer: Answer) -> Answer:
        turns[-1] = Turn(turns[-1].question, answer.text)
        self.turns, self.images, self.last = turns, images, answer
        return answer

    def reset(self) -> None:
        self.turns, self.images, self.last = [], [], None
