"""Checking a chat-completions request before any work is done for it.

Every field is type- and range-checked (booleans are not numbers), fields this server does not
implement are refused when they would change the answer, and the prompt's text is capped in
UTF-8 bytes before anything is tokenized: an oversized prompt costs the server a length check,
never a tokenizer pass. Errors are `HTTPProblem`s naming the field (`param`)."""

from __future__ import annotations

import dataclasses
import json
import math

from ..config import IMAGE_TOKEN
from ..data.templates import Turn
from ..generation import SamplingConfig
from .http_errors import HTTPProblem

MAX_SEED = 2**63 - 1
MAX_STOP_CHARS = 256
ROLES = ("system", "developer", "user", "assistant")


def json_type(value) -> str:
    """The JSON name of a value's type, for messages (the value itself may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def short(value, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else json_type(value)
    return text if len(text) <= limit else text[:limit] + "..."


def bad(param: str, message: str, status: int = 400) -> HTTPProblem:
    """A 400 whose message starts with the field's name."""
    return HTTPProblem(status, f"{param} {message}", param=param)


# --- the body ---------------------------------------------------------------------------------

def check_content_type(header: str | None) -> None:
    media = (header or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        sent = f"not {header[:60]}" if header else "it is missing"
        raise HTTPProblem(415, f"Content-Type must be application/json ({sent}); send the request as JSON")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict:
    """The request's JSON object; NaN/Infinity, invalid UTF-8 and nesting deeper than Python's
    recursion limit are 400s, as is anything that is not an object."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise HTTPProblem(400, "request body is nested too deeply") from None
    except UnicodeDecodeError:
        raise HTTPProblem(400, "request body is not valid UTF-8") from None
    except ValueError as err:
        raise HTTPProblem(400, f"request body must be JSON ({str(err)[:120]})") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, f"request body must be a JSON object, not {json_type(body)}")
    return body


# --- scalar fields ----------------------------------------------------------------------------

def integer(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, not {short(value)}")
    if lo is not None and not lo <= value <= hi:
        raise bad(name, f"must be in [{lo}, {hi}], got {value if abs(value) < 10**20 else 'a larger number'}")
    return value


def number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"must be a number, not {short(value)}")
    value = float(value) if abs(value) < 1e300 else math.inf
    if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or value > hi:
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value:g}")
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, not {short(value)}")
    return value


def stop_strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"must be a string or a list of strings, not {short(value)}")
    if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"must be at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
    return tuple(stops)


# The other OpenAI fields: JSON type and the values accepted (None: any). Those this server does not
# implement are accepted only at their neutral value: an answer is never computed without what the
# client asked for.
NEUTRAL = {"frequency_penalty": (float, (0,)),
           "presence_penalty": (float, (0,)), "logit_bias": (dict, ({},)), "tools": (list, ([],)),
           "functions": (list, ([],)), "tool_choice": (str, ("none", "auto")), "user": (str, None),
           "stream_options": (dict, None), "response_format": (dict, ({"type": "text"},)), "model": (str, None)}
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
              list: "an array"}


def _is(value, kind) -> bool:
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def check_unsupported(body: dict) -> None:
    for name, (kind, accepted) in NEUTRAL.items():
        value = body.get(name)
        if value is None:
            continue
        if not _is(value, kind):
            raise bad(name, f"must be {TYPE_NAMES[kind]}, not {short(value)}")
        if accepted is not None and value not in accepted:
            raise bad(name, f"= {short(value)} is not supported by this server; leave {name} out")


# Options the generation engine may implement (SamplingConfig fields): passed on when it does,
# else accepted only at their neutral value like the fields above.
ENGINE_OPTIONS = {"logprobs", "top_logprobs", "ignore_eos"}


def engine_options(body: dict) -> dict:
    """SamplingConfig keyword arguments for `logprobs`, `top_logprobs` (0 to 20, needs logprobs)
    and `ignore_eos`, checked."""
    options = {"logprobs": boolean(body, "logprobs"), "top_logprobs": integer(body, "top_logprobs", 0, 0, 20),
               "ignore_eos": boolean(body, "ignore_eos")}
    if options["top_logprobs"] and not options["logprobs"]:
        raise bad("top_logprobs", "needs logprobs: true")
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    for name in sorted(ENGINE_OPTIONS - known):
        if options.pop(name):
            raise bad(name, f"is not supported by this server; leave {name} out")
    return options


def sampling_config(body: dict, limits) -> SamplingConfig:
    """The generation settings of a request, every field checked."""
    check_unsupported(body)
    options = engine_options(body)
    if integer(body, "n", 1) != 1:
        raise bad("n", "must be 1 (one answer per request)")
    boolean(body, "stream")
    if isinstance(body.get("stream_options"), dict):
        boolean(body["stream_options"], "include_usage")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    for field in ("max_tokens", "max_completion_tokens"):
        integer(body, field, None)  # the type, whichever one is used
    max_tokens = integer(body, name, min(limits.default_max_tokens, limits.max_tokens))  # unset: never above the cap
    if max_tokens < 1:
        raise bad(name, f"must be a positive integer, got {max_tokens}")
    if max_tokens > limits.max_tokens:
        shown = max_tokens if max_tokens < 10**20 else "a larger number"
        raise bad(name, f"= {shown} is above this server's limit of {limits.max_tokens}")
    temperature = number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = integer(body, "top_k", 0, 0, 1_000_000)
    seed = integer(body, "seed", None, 0, MAX_SEED)
    return SamplingConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                          top_k=top_k, top_p=top_p, stop=stop_strings(body.get("stop")), seed=seed, **options)


def check_model(body: dict, served: str, accepted) -> None:
    """A request naming a model other than the one served (or one of its `accepted` aliases) is a
    404, as OpenAI answers it."""
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise bad("model", f"must be a string, not {short(name)}")
    if name is not None and name != served and name not in accepted:
        raise HTTPProblem(404, f"the model {short(name, 80)} does not exist here; this server serves {served} "
                               "(GET /v1/models)", param="model", code="model_not_found")


def parse_window(value, param: str):
    """A DICOM/NIfTI window: a preset name or [center, width]."""
    if value is None or (isinstance(value, str) and 0 < len(value) <= 64):
        return value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[1] > 0):
        return float(value[0]), float(value[1])
    raise bad(param, f"must be a window name (lung, bone, ...) or [center, width] with width > 0, not {short(value)}")


# --- messages ---------------------------------------------------------------------------------

class PromptBudget:
    """Counts a prompt's content parts and the UTF-8 bytes of its text, refusing it past the
    limits (413 for text); text with lone surrogates (JSON `\\ud800`) is not Unicode (400)."""

    def __init__(self, limits):
        self.limit, self.max_prompt_tokens, self.used = limits.text_bytes, limits.max_prompt_tokens, 0
        self.max_parts, self.parts = limits.max_content_parts, 0

    def count_parts(self, n: int, param: str) -> None:
        self.parts += n
        if self.parts > self.max_parts:
            raise bad(param, f"takes the request over {self.max_parts} content parts")

    def take(self, text: str, param: str) -> str:
        if len(text) + self.used <= self.limit:  # a character is at least one byte: no encoding past the limit
            try:
                self.used += len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise bad(param, "is not valid Unicode (it holds an unpaired surrogate escape)") from None
        else:
            self.used = self.limit + 1
        if self.used > self.limit:
            raise HTTPProblem(413, f"the prompt's text is over {self.limit:,} bytes (this server takes prompts of at "
                                   f"most {self.max_prompt_tokens} tokens); shorten it", param=param)
        return text


def parse_messages(messages, limits) -> tuple[list[Turn], list]:
    """OpenAI messages -> (turns with `<image>` placeholders, (url, window) of each image in order).

    System (and developer) messages are ignored: the model's own template sets the system prompt."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"must be a non-empty list, not {short(messages) if messages != [] else 'empty'}")
    if len(messages) > limits.max_messages:
        raise bad("messages", f"holds {len(messages)} messages; at most {limits.max_messages}")
    budget = PromptBudget(limits)
    turns: list[Turn] = []
    images: list = []
    question: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"must be an object with role and content, not {short(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role", f"= {short(role)} is an unsupported role; use system, user or assistant")
        if role in ("system", "developer"):
            continue
        if role == "user":
            question.append(_user_text(content, images, limits, budget, f"{where}.content"))
        elif not question:
            raise bad(where, "is an assistant message; an assistant message must follow a user message")
        else:
            turns.append(Turn("\n".join(question), _plain_text(content, budget, f"{where}.content")))
            question = []
    if not question:
        raise bad("messages", "must end with a user message")
    turns.append(Turn("\n".join(question)))
    return turns, images


def _content_parts(content: list, budget: PromptBudget, where: str):
    budget.count_parts(len(content), where)
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad(f"{where}[{j}]", f"must be an object with a type, not {short(part)}")
        yield f"{where}[{j}]", part.get("type"), part


def _text_of(part: dict, where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise bad(f"{where}.text", f"must be a string, not {short(text)}")
    return text


def _plain_text(content, budget: PromptBudget, where: str) -> str:
    if isinstance(content, str):
        return budget.take(content, where)
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(where, f"must be a string or a list of parts, not {short(content)}")
    return "".join(budget.take(_text_of(part, at), at) for at, kind, part in _content_parts(content, budget, where)
                   if kind == "text")


def _user_text(content, images: list, limits, budget: PromptBudget, where: str) -> str:
    if isinstance(content, str):
        return budget.take(content, where).replace(IMAGE_TOKEN, "[image]")  # a typed "<image>" is text
    if not isinstance(content, list):
        raise bad(where, f"must be a string or a list of parts, not {short(content)}")
    pieces = []
    for at, kind, part in _content_parts(content, budget, where):
        if kind == "text":
            pieces.append(budget.take(_text_of(part, at), at).replace(IMAGE_TOKEN, "[image]"))
        elif kind == "image_url":
            if len(images) >= limits.max_images:
                raise bad(at, f"is one image too many: at most {limits.max_images} images per request")
            images.append(_image_spec(part.get("image_url"), f"{at}.image_url"))
            pieces.append(IMAGE_TOKEN + "\n")
        else:
            raise bad(f"{at}.type", f"= {short(kind)} is not supported; use text or image_url")
    return "".join(pieces)


def _image_spec(spec, where: str) -> tuple:
    spec = spec if isinstance(spec, dict) else {"url": spec}
    if not isinstance(spec.get("url"), str):
        raise bad(f"{where}.url", f"must be a string (a data: URL), not {short(spec.get('url'))}")
    return spec["url"], parse_window(spec.get("window"), f"{where}.window")


def preview_spec(body: dict) -> tuple:
    """(url, window) of a /v1/preview request: `image_url` is a data URL or {"url": ...}."""
    spec = body.get("image_url")
    if isinstance(spec, dict) and "window" not in spec:
        spec = {**spec, "window": body.get("window")}
    return _image_spec(spec if isinstance(spec, dict) else {"url": spec, "window": body.get("window")}, "image_url")


MAX_LABELS = 64


def classify_spec(body: dict, limits) -> tuple:
    """((url, window), labels, question or None, calibrate) of a /v1/classify request, checked:
    `image_url` as /v1/preview takes it, `labels` 2 to 64 distinct non-empty strings, `question`
    a string, `calibrate` a boolean (default true)."""
    if body.get("image_url") is None:
        raise bad("image_url", "is required: the image to classify, as a data: URL or {\"url\": ...}")
    spec = preview_spec(body)
    labels = body.get("labels")
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise bad("labels", f"must be an array of 2 to {MAX_LABELS} labels, not {short(labels)}")
    budget = PromptBudget(limits)
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise bad(f"labels[{i}]", f"must be a non-empty string, not {short(label)}")
        budget.take(label, f"labels[{i}]")
    if len(set(labels)) < len(labels):
        raise bad("labels", "must be distinct")
    question = body.get("question")
    if question is not None and not isinstance(question, str):
        raise bad("question", f"must be a string, not {short(question)}")
    if question is not None:
        budget.take(question, "question")
    return spec, labels, question or None, boolean(body, "calibrate", True)

