"""What goes into the engine and what comes out: a request (one prompt and its own sampling
settings), the pieces it streams (text, tokens, log-probabilities) and its final result.

    handle = engine.submit(Request(prompt, SamplingConfig(max_new_tokens=64, logprobs=True)))
    for piece in handle:          # Delta(text, token_ids, logprobs) as tokens are produced
        print(piece.text, end="")
    result = handle.result()      # Result(text, token_ids, finish_reason, ...)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import IMAGE_TOKEN
from ..data.images import load_image
from ..data.templates import Turn
from ..errors import DataError
from ..generation.generate import SamplingConfig
from ..moe import LayerRouting

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    input_ids: list[int]  # the prompt's tokens, no padding; `<image>` expanded to the image's token count
    pixel_values: torch.Tensor | None = None  # [images, 3, H, W] in the order of the prompt's image tokens
    # prefix_cache.image_digest of each image, where the caller computed them ahead (eval: in its image
    # reader threads); None: the engine computes them when the request arrives
    image_digests: tuple[bytes, ...] | None = None


def encode_conversation(processor, turns: list[Turn], images: list) -> Prompt:
    """The prompt of a conversation whose last turn is unanswered. images: in the order of the
    `<image>` placeholders; with exactly one image and no placeholder it goes in front of the first
    question (the paper's prompt)."""
    images = [load_image(i) for i in images]
    placeholders = sum(t.question.count(IMAGE_TOKEN) for t in turns)
    if len(images) == 1 and placeholders == 0:
        turns = [Turn(processor.prompt(turns[0].question, True), turns[0].answer)] + list(turns[1:])
        placeholders = 1
    if placeholders != len(images):
        raise DataError(f"the conversation has {placeholders} {IMAGE_TOKEN} placeholders but {len(images)} images")
    pixels = torch.stack([processor.image_tensor(i) for i in images]) if images else None
    return Prompt(list(processor.encode(list(turns)).input_ids), pixels)


def encode_question(processor, question: str, image=None) -> Prompt:
    """The prompt of one question with zero, one or several images (as `processor(...)` builds it)."""
    batch = processor([question], [image])
    return Prompt(batch["input_ids"][0].tolist(), batch.get("pixel_values"))


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class Delta:
    """What one request produced since its last delta."""
    text: str  # new answer text (held back while a multi-byte character is incomplete)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop", "length" or "cancelled"
    prompt_tokens: int
    prompt_ids: list[int]
    prompt_routing: list[LayerRouting] | None = None  # per MoE layer, [1, prompt_tokens, ...], when asked for
    logprobs: list[TokenLogprob] | None = None
    # In [0, 1] (None: no answer token): for "yes" / "no", the chosen answer's probability against the
    # other; otherwise the geometric mean of the answer tokens' probabilities (engine/confidence.py).
    confidence: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Request:
    prompt: Prompt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output_routing: bool = False  # keep the prompt's routing records (routing summaries)
    on_delta: Callable[[Delta], None] | None = None  # called from the engine's thread
    on_done: Callable[["Result | None", "BaseException | None"], None] | None = None  # likewise, at the end
    deadline: float | None = None  # time.monotonic() past which the request is cancelled
    is_cancelled: Callable[[], bool] | None = None  # polled every step (e.g. the client has gone)


class Handle:
    """A submitted request: iterate it for its deltas, `result()` for the end, `cancel()` to stop it."""

    def __init__(self, request: Request, engine=None):
        self.request, self.engine = request, engine
        self.submitted = time.perf_counter()  # for the engine's queue wait and time to first token
        self._cancel = False
        self._deltas: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        check = self.request.is_cancelled
        return self._cancel or (check is not None and bool(check()))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, delta: Delta) -> None:
        if self.request.on_delta is not None:
            try:
                self.request.on_delta(delta)
            except Exception:  # the listener is broken or gone: stop generating for it
                logger.exception("on_delta failed; cancelling the request")
                self._cancel = True
        self._deltas.put(delta)

    def _finish(self, result: Result | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._deltas.put(None)
        if self.request.on_done is not None:
            try:
                self.request.on_done(result, error)
            except Exception:
                logger.exception("on_done failed")

    def result(self, timeout: float | None = None) -> Result:
        if self.engine is not None:
            self.engine.wait(self, timeout)
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result

    def __iter__(self):
        while True:
            if self.engine is not None and not self.engine.running:
                while self._deltas.empty():  # no background runner: the engine steps in this thread
                    self.engine.step()
            delta = self._deltas.get()
            if delta is None:
                if self._error is not None:
                    raise self._error
                return
            yield delta
