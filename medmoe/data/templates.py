"""Chat templates and tokenisation with labels on answer tokens only.

Templates:
- "medmoe": the paper's (LLaVA v1 / Phi) template: `{system} USER: <image>\\n{q} ASSISTANT: {a}<eos>`.
- "plain": alignment (phase 1): `<image>{caption}\\n`, the caption is the label.
- "chat": the LLM's own chat template (SmolLM2 ships one), through `tokenizer.apply_chat_template`.

Each turn is tokenised as prompt segment + answer segment, so training sees exactly the prompt
ids that generation will see. `<image>` becomes `num_image_tokens` copies of the image token id;
those positions never carry labels.

Segment-wise tokenisation can differ from tokenising the whole text at once (a BPE merge across
a segment boundary, a tokenizer that adds a prefix space to every call). LLaVA calls this a
"tokenization mismatch" and silently drops such samples. Here `encode(..., check=True)` compares
the two and records the answer in `Encoded.aligned`; the dataset reports each one by its id.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import IMAGE_TOKEN
from ..errors import DataError

IGNORE_INDEX = -100
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("medmoe", "plain", "chat")


@dataclass
class Turn:
    question: str
    answer: str | None = None  # None: the model is to answer (generation prompt)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    aligned: bool = True  # False: segment-wise ids differ from tokenising the full text at once


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _expand_images(ids: list[int], image_token_id: int, num_image_tokens: int) -> list[int]:
    out: list[int] = []
    for i in ids:
        out.extend([i] * num_image_tokens if i == image_token_id else [i])
    return out


def _segments(tokenizer, template: str, turns: list[Turn], system: str | None) -> list[tuple[str, bool]]:
    """(text, is_label) pieces in order."""
    eos = tokenizer.eos_token or ""
    if template == "plain":
        if len(turns) != 1 or turns[0].answer is None:
            return [(IMAGE_TOKEN, False)]
        question = turns[0].question
        prefix = IMAGE_TOKEN if IMAGE_TOKEN in question or not question else question
        return [(prefix, False), (turns[0].answer + "\n", True)]
    if template == "medmoe":
        pieces: list[tuple[str, bool]] = []
        text = (system if system is not None else SYSTEM_PROMPT)
        for turn in turns:
            text += f" USER: {turn.question} ASSISTANT:"
            if turn.answer is None:
                break
            pieces.append((text, False))
            pieces.append((f" {turn.answer}{eos}", True))
            text = ""
        if text:
            pieces.append((text, False))
        return pieces
    if template == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        pieces = []
        rendered = ""
        for turn in turns:
            messages.append({"role": "user", "content": turn.question})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            pieces.append((prompt[len(rendered):], False))
            rendered = prompt
            if turn.answer is None:
                break
            messages.append({"role": "assistant", "content": turn.answer})
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            if not full.startswith(rendered):
                raise DataError("the tokenizer's chat template does not extend its own generation prompt; use template 'medmoe'")
            pieces.append((full[len(rendered):], True))
            rendered = full
        return pieces
    raise DataError(f"unknown template {template!r}; use one of {TEMPLATES}")


def encode(tokenizer, turns: list[Turn], template: str, image_token_id: int | None, num_image_tokens: int,
           system: str | None = None, check: bool = False) -> Encoded:
    input_ids: list[int] = []
    labels: list[int] = []
    if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError("template 'chat' needs a tokenizer with a chat template; use 'medmoe'")
    bos = getattr(tokenizer, "bos_token_id", None)
    if template == "medmoe" and bos is not None and getattr(tokenizer, "add_bos_token", False):
        input_ids.append(bos)
        labels.append(IGNORE_INDEX)
    segments = _segments(tokenizer, template, turns, system)
    raw: list[int] = []
    for text, is_label in segments:
        ids = _ids(tokenizer, text)
        raw.extend(ids)
        if image_token_id is not None:
            ids = _expand_images(ids, image_token_id, num_image_tokens)
        input_ids.extend(ids)
        if is_label:
            labels.extend(IGNORE_INDEX if i == image_token_id else i for i in ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    aligned = _ids(tokenizer, "".join(text for text, _ in segments)) == raw if check else True
    return Encoded(input_ids=input_ids, labels=labels, aligned=aligned)


def count_images(text: str) -> int:
    return text.count(IMAGE_TOKEN)
