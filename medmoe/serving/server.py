"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) and the web page, in one process.

    POST /v1/chat/completions   OpenAI chat-completions shape; images as data: URLs in
                                `image_url` parts; `stream: true` gives server-sent events
    GET  /v1/models             the one model served
    GET  /health                liveness and queue depth
    GET  /v1/engine/stats       what the inference engine did (engine/stats.py): requests, prefill,
                                decode steps by CUDA graph replay or eager, captures, cache growths,
                                host seconds by phase
    POST /v1/preview            an uploaded image (DICOM/NIfTI too) as the PNG the model sees
    POST /v1/classify           the likeliest of the given labels for an image, with each label's
                                probability (calibrated by the question without the image)
    GET  /                      the web page

One worker thread owns the model. Requests are validated and their images decoded in the
request handlers, then queued (bounded: a full queue answers 503); the inference engine
(medmoe.engine) runs up to `max_batch` requests at once with continuous batching: a request joins
the running batch at the next decode step, keeps its own sampling settings, streams on its own
and leaves when it ends. Every request has a deadline (504 past it).

The server only reads what a request carries: images must be base64 `data:` URLs. It never
opens a path or fetches a URL named in a request (http(s) image URLs get a 400 saying so).
Every field of a request is type- and range-checked and its text capped in bytes before anything
is tokenized (validation.py); every error, the framework's own 404/405/422 and any unexpected
500 included, is an OpenAI error object; `api_key` makes every /v1/ endpoint ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import binascii
import io
import json
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..data.templates import Turn
from ..engine.stats import summary_line
from ..errors import MedMoEError
from ..generation import SamplingConfig
from .auth import BearerAuth
from .front_end_stats import FrontEndStats
from .http_errors import HTTPProblem, install_error_handlers
from .validation import (check_content_type, check_model, classify_spec, parse_json, parse_messages, preview_spec,
                         sampling_config)

logger = logging.getLogger(__name__)
WEB_PAGE = Path(__file__).with_name("web") / "index.html"


GPU_SLOTS, CPU_SLOTS = 32, 8  # default engine slots: a GPU step costs about the same for 1 or 32 rows


@dataclass
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024  # a whole request, base64 images included
    max_image_pixels: int = 40_000_000  # width x height of one decoded image (or DICOM frame / NIfTI slice)
    max_images: int = 4  # per request
    max_messages: int = 64
    max_prompt_tokens: int = 4096  # after image tokens are expanded
    max_tokens: int = 512  # cap on a request's max_tokens
    default_max_tokens: int = 128
    max_batch: int | None = None  # requests decoded together (the engine's slots); None: 32 on a GPU, 8 on a CPU
    queue_size: int = 64  # requests waiting; more get 503
    timeout_s: float = 120.0  # from arrival to the last token; 504 past it
    max_text_bytes: int | None = None  # UTF-8 bytes of a prompt's text; None: 16 per prompt token
    max_content_parts: int = 256  # text and image parts of all messages together
    prefix_cache_mb: float | None = None  # the engine's prefix cache (0: off); None: config.RuntimeOptions
    prefill_chunk: int | None = None  # prompt tokens prefilled between decode steps; None: config.RuntimeOptions
    admit_batch: int | None = None  # free slots new prompts wait for while others decode; None: config.RuntimeOptions
    prefill_graphs: bool | None = None  # prefill as CUDA graphs into the KV cache; None: config.RuntimeOptions
    min_confidence: float | None = None  # answers below it are marked "withheld" (the web page hides them)

    @property
    def text_bytes(self) -> int:
        """The text cap, checked before tokenizing: generous (a token is rarely over 4 bytes of
        UTF-8) yet small enough that the tokenizer's time and memory stay bounded."""
        return self.max_text_bytes if self.max_text_bytes is not None else 16 * self.max_prompt_tokens


# --- requests -> conversations ----------------------------------------------------------------

MEDIA_NAMES = {"application/dicom": "upload.dcm", "application/x-nifti": "upload.nii",
               "application/gzip": "upload.nii.gz", "application/x-gzip": "upload.nii.gz"}


def decode_data_url(url: str, limits: Limits) -> tuple[bytes, str]:
    """(bytes, name hint) of a base64 data: URL. Anything else is refused without being opened."""
    if not isinstance(url, str):
        raise HTTPProblem(400, "image_url.url must be a string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        raise HTTPProblem(400, f"image URLs with scheme {scheme or '(none)'!r} are refused: this server never fetches "
                               "URLs or opens server-side paths; send the image inline as a base64 data: URL "
                               "(data:image/png;base64,...)")
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise HTTPProblem(400, "image data URL must be base64: data:<media type>;base64,<data>")
    if len(payload) * 3 // 4 > limits.max_body_bytes:
        raise HTTPProblem(413, "image too large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPProblem(400, "image data URL is not valid base64") from None
    media = header[5:].split(";", 1)[0].lower()
    return data, MEDIA_NAMES.get(media, "upload")


def open_upload(data: bytes, name: str, limits: Limits, window=None):
    """Decode uploaded bytes to a PIL RGB image within the decoding budget: sizes come from the
    headers and are checked before any pixel is decoded or any stream inflated (413 when over)."""
    from ..data.images import load_image
    from ..data.limits import DEFAULT_LIMITS, ImageTooLargeError
    from ..data.medical_images import load_medical, medical_kind

    budget = DEFAULT_LIMITS.with_pixels(limits.max_image_pixels)
    label = f"the uploaded image ({name})" if name != "upload" else "the uploaded image"
    try:
        kind = medical_kind(data, name)
        if kind is not None:
            return load_medical(data, name=label, kind=kind, window=window, limits=budget)
        if window is not None:
            raise HTTPProblem(400, "window applies to DICOM and NIfTI images only")
        return load_image(data, name=label, limits=budget)
    except ImageTooLargeError as err:
        raise HTTPProblem(413, str(err)) from None
    except MedMoEError as err:
        raise HTTPProblem(400, str(err)) from None


# --- the worker -------------------------------------------------------------------------------

class Mailbox:
    """Events from the engine's thread to one event loop's queues, handed over in batches: the
    engine's thread wakes the loop once for everything posted before the loop takes it, not once
    per token and stream (32 wake-ups a decode step at 32 streams, each a write to the loop's
    socket and a hand-over of the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.posted: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, event: tuple) -> bool:
        """Queue `event` for `queue` (from any thread); False when the loop is gone."""
        with self.lock:
            self.posted.append((queue, event))
            if len(self.posted) > 1:  # a wake-up is already on its way
                return True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self.lock:
                self.posted.clear()
            return False
        return True

    def _deliver(self) -> None:
        with self.lock:
            posted, self.posted = self.posted, []
        for queue, event in posted:
            queue.put_nowait(event)


_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's one mailbox (made in the loop's thread)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


@dataclass
class Job:
    turns: list[Turn]
    images: list
    cfg: SamplingConfig
    mailbox: Mailbox
    events: asyncio.Queue
    deadline: float
    arrived: float  # time.perf_counter() when the request reached its handler
    first_post: float | None = None  # when the engine posted its first text (FrontEndStats.handoff_s)
    cancelled: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")

    def emit(self, kind: str, payload) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        if kind == "text" and self.first_post is None:
            self.first_post = time.perf_counter()
        if not self.mailbox.post(self.events, (kind, payload)):  # the loop is gone: the client left
            self.cancelled = True


class Worker:
    """The server's side of the inference engine (medmoe.engine): requests become engine requests
    with their own sampling settings; the engine's background thread runs them with continuous
    batching (a request joins the running batch at the next step) and streams each to its client."""

    def __init__(self, model, processor, limits: Limits, compile: bool = False):
        from ..engine import Engine as InferenceEngine

        self.model, self.processor, self.limits = model, processor, limits
        self.front = FrontEndStats()  # written by the event loop's thread only
        slots = limits.max_batch or (GPU_SLOTS if model.device.type == "cuda" else CPU_SLOTS)
        self.engine = InferenceEngine(model, processor, max_slots=slots,
                                      max_len=limits.max_prompt_tokens + limits.max_tokens,
                                      max_waiting=limits.queue_size, compile=compile,
                                      prefix_cache_mb=limits.prefix_cache_mb, prefill_chunk=limits.prefill_chunk,
                                      admit_batch=limits.admit_batch, prefill_graphs=limits.prefill_graphs)


    def stats(self) -> dict:
        """The engine's settings and its statistics since start-up (warm-up included)."""
        engine, step = self.engine, self.engine.step_fn
        record = engine.stats.as_dict()
        return {"slots": engine.max_slots, "max_len": engine.max_len, "cuda_graphs": step.cuda_graphs,
                "compiled": step.compiled, "graphs": len(step.graphs), "overlap_steps": engine.overlap_steps,
                "prefill_graphs": len(engine.prefill_step.graphs) if engine.prefill_step is not None else None,
                "running": len(engine.active), "queued": engine.queued, "stats": record,
                "summary": summary_line(record), "front_end": self.front.as_dict()}

    def start(self) -> None:
        from ..engine.scheduler import keep_out_of_gc

        self.engine.warmup()  # kernels, CUDA graphs and torch.compile before the first request
        keep_out_of_gc()  # the server keeps its model to the end
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def classify(self, image, labels: list[str], question: str | None, calibrate: bool):
        """Label scoring (api.classify_image) between two of the engine's steps."""
        from .api import classify_image

        with self.engine.exclusive():
            return classify_image(self.model, self.processor, image, labels, question, calibrate)

    def submit(self, job: Job) -> None:
        """Encode the job's prompt (in the caller's thread) and queue it; 400, 503 as the case is."""
        from ..engine import EngineBusy, Request, RequestTooLong, encode_conversation

        try:
            prompt = encode_conversation(self.processor, job.turns, job.images)
        except MedMoEError as err:
            raise HTTPProblem(400, str(err)) from None
        n = len(prompt.input_ids)
        if n > self.limits.max_prompt_tokens:
            raise HTTPProblem(400, f"the prompt is {n} tokens (images included), above the limit of "
                                   f"{self.limits.max_prompt_tokens}; shorten the conversation")
        request = Request(prompt, job.cfg, output_routing=True, deadline=job.deadline,
                          on_delta=lambda delta: job.emit("text", delta),
                          on_done=lambda result, error: self._done(job, result, error),
                          is_cancelled=lambda: job.cancelled)
        try:
            self.engine.submit(request)
        except EngineBusy:
            raise HTTPProblem(503, "server busy: the request queue is full; retry shortly", "server_busy") from None
        except RequestTooLong as err:
            raise HTTPProblem(400, str(err)) from None

    def _done(self, job: Job, result, error) -> None:
        from .api import answers_from

        if error is not None:
            if isinstance(error, (MedMoEError, ValueError)):
                job.emit("error", HTTPProblem(400, str(error)))
            else:
                job.emit("error", HTTPProblem(500, "generation failed; see the server log", "server_error"))
        elif result.finish_reason == "cancelled":
            if not job.cancelled:  # the deadline passed
                job.emit("error", HTTPProblem(504, f"no answer within {self.limits.timeout_s:g} s", "timeout"))
        else:
            job.emit("done", answers_from(self.model, [result], self.engine.pad_id)[0])


def openai_logprobs(entries) -> dict:
    """OpenAI's `logprobs` of a choice: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, p) for _, t, p in e.top]}
                        for e in entries]}


# --- the app ----------------------------------------------------------------------------------

def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def served_model_name(path: str) -> str:
    """The id /v1/models reports for a model folder: `medmoe-nano` for the bundled `nano`, else
    the folder's name."""
    from ..model.pretrained import BUNDLED_MODELS, resolve_model_path

    if path in BUNDLED_MODELS and resolve_model_path(path) != path:
        return f"medmoe-{path}"
    return Path(path).resolve().name or "medmoe"


async def read_json(request: Request, limits: Limits) -> dict:
    """The request's JSON object: Content-Type checked, size counted as the body arrives."""
    check_content_type(request.headers.get("content-type"))
    too_large = HTTPProblem(413, f"request body over {limits.max_body_bytes:,} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives: no trust in the header
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPProblem(400, "the client left before sending the whole body") from None
    raw = b"".join(chunks)
    if len(raw) > 1 << 20:  # a large body is parsed off the event loop, which keeps serving others
        return await run_in_threadpool(parse_json, raw)
    return parse_json(raw)


def load_images(specs, limits: Limits) -> list:
    """Decoded images of (data URL, window) specs. A decoder failing in a way it does not name
    (a library's own exception on a corrupt file) is the file's fault: a 400, logged."""
    images = []
    for i, (url, window) in enumerate(specs):
        data, name = decode_data_url(url, limits)
        try:
            image = open_upload(data, name, limits, window)
        except (HTTPProblem, MemoryError):
            raise
        except Exception as err:
            # The type only: a decoder's message may quote header fields (patient data in DICOM).
            logger.warning("image %d of a request could not be decoded (%s)", i + 1, type(err).__name__)
            raise HTTPProblem(400, f"image {i + 1} could not be decoded ({type(err).__name__}); "
                                   "check that it is a whole, valid file") from None
        if image.width < 1 or image.height < 1:
            raise HTTPProblem(400, f"image {i + 1} has no pixels ({image.width}x{image.height})")
        images.append(image)
    return images


def create_app(model_or_path, processor=None, limits: Limits | None = None, model_name: str | None = None,
               device: str | None = None, dtype: str | None = None, quantize: str | None = None,
               api_key: str | None = None, model_aliases=(), compile: bool = False):
    """The FastAPI app serving a model folder (or an already loaded model + processor).

    Requests may name the model `model_name` (default: `served_model_name` of the folder) or one
    of `model_aliases` (a folder given by path also answers to that path); `api_key` makes every
    /v1/ endpoint require `Authorization: Bearer <api_key>`; `compile`: the engine's decode step through
    torch.compile (compiled at start-up)."""
    from contextlib import asynccontextmanager

    from .api import load_model

    limits = limits or Limits()
    accepted = set(model_aliases)
    if isinstance(model_or_path, (str, Path)):
        model_name = model_name or served_model_name(str(model_or_path))
        accepted.add(str(model_or_path))
        model, processor = load_model(str(model_or_path), device, dtype, quantize)
    else:
        model = model_or_path
        if processor is None:
            raise ValueError("create_app(model, processor): a loaded model needs its processor")
    model_name = model_name or "medmoe"
    engine = Worker(model, processor, limits, compile=compile)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="medmoe", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.model_name, app.state.auth = engine, model_name, bool(api_key)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health():
        stats = engine.engine.stats
        return {"status": "ok", "model": model_name, "device": str(model.device),
                "queued": engine.engine.queued, "batches": stats.decode_steps, "largest_batch": stats.largest_batch,
                "prompt_tokens_prefilled": stats.prefill_tokens, "prompt_tokens_reused": stats.reused_tokens}

    @app.get("/v1/engine/stats")
    async def engine_stats():
        return engine.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "medmoe"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"),
                            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                                                "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

    @app.post("/v1/preview")
    async def preview(request: Request):
        body = await read_json(request, limits)
        image = (await run_in_threadpool(load_images, [preview_spec(body)], limits))[0]
        out = io.BytesIO()
        image.save(out, format="PNG")
        return {"data_url": "data:image/png;base64," + base64.b64encode(out.getvalue()).decode(),
                "width": image.width, "height": image.height,
                "reduction": image.info.get("medmoe_reduction"), "window": image.info.get("medmoe_window")}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await read_json(request, limits)
        check_model(body, model_name, accepted)
        spec, labels, question, calibrate = classify_spec(body, limits)
        image = (await run_in_threadpool(load_images, [spec], limits))[0]
        result = await run_in_threadpool(engine.classify, image, labels, question, calibrate)
        return {"object": "classification", "model": model_name, **result.to_dict(),
                **({} if limits.min_confidence is None else
                   {"withheld": result.probabilities[result.label] < limits.min_confidence})}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        body = await read_json(request, limits)
        check_model(body, model_name, accepted)
        cfg = sampling_config(body, limits)
        turns, specs = parse_messages(body.get("messages"), limits)
        read = time.perf_counter()
        images = await run_in_threadpool(load_images, specs, limits)
        loaded = time.perf_counter()
        job = Job(turns, images, cfg, mailbox(asyncio.get_running_loop()), asyncio.Queue(),
                  time.monotonic() + limits.timeout_s, arrived=arrived)
        await run_in_threadpool(engine.submit, job)  # tokenising and image preprocessing off the event loop
        front = engine.front
        front.requests += 1
        front.read_s += read - arrived
        front.images_s += loaded - read
        front.encode_s += time.perf_counter() - loaded
        if body.get("stream"):
            return StreamingResponse(sse(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, answer = await collect(job)
        finally:
            job.cancelled = True  # nothing more is read for this job
        return completion(job, answer)

    async def next_event(job: Job):
        if not job.events.empty():  # most tokens of a busy server: no timeout to set up
            return job.events.get_nowait()
        remaining = job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.0) + 1.0)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise HTTPProblem(504, f"no answer within {limits.timeout_s:g} s", "timeout") from None

    async def collect(job: Job):
        pieces = []
        while True:
            kind, payload = await next_event(job)
            if kind == "text":
                pieces.append(payload.text)
            elif kind == "error":
                raise payload
            else:
                return "".join(pieces), payload

    def completion(job: Job, answer) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                  "finish_reason": _finish_reason(answer.finish_reason)}
        if job.cfg.logprobs:
            choice["logprobs"] = openai_logprobs(answer.logprobs or [])
        return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [choice],
                "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                          "total_tokens": answer.prompt_tokens + answer.completion_tokens},
                "routing": answer.routing.to_dict() if answer.routing else None, "confidence": answer.confidence,
                **withheld(answer)}

    def withheld(answer) -> dict:
        """The deployment's verdict beside the confidence, where `--min-confidence` is set."""
        return {} if limits.min_confidence is None else {"withheld": answer.withheld(limits.min_confidence)}

    def chunk(job: Job, delta: dict, finish: str | None = None, logprobs=None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = openai_logprobs(logprobs)
        record = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                  "choices": [choice], **extra}
        return f"data: {json.dumps(record)}\n\n"

    def first_chunk(job: Job) -> None:
        now, front = time.perf_counter(), engine.front
        front.first_chunks += 1
        front.to_first_chunk_s += now - job.arrived
        front.handoff_s += now - (job.first_post or now)

    async def sse(job: Job):
        first = True
        try:
            yield chunk(job, {"role": "assistant"})
            while True:
                try:
                    kind, payload = await next_event(job)
                except HTTPProblem as err:
                    kind, payload = "error", err
                if kind == "text":
                    if payload.text or (job.cfg.logprobs and payload.logprobs):
                        if first:
                            first_chunk(job)
                            first = False
                        yield chunk(job, {"content": payload.text}, logprobs=payload.logprobs if job.cfg.logprobs else None)
                elif kind == "error":
                    yield payload.event()
                    break
                else:
                    answer = payload
                    usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                             "total_tokens": answer.prompt_tokens + answer.completion_tokens}
                    yield chunk(job, {}, _finish_reason(answer.finish_reason), usage=usage,
                                routing=answer.routing.to_dict() if answer.routing else None,
                                confidence=answer.confidence, **withheld(answer))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # also when the client went away mid-stream

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                limit_concurrency=app.state.engine.limits.queue_size * 2 + 16)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
    """Run the app in a background thread (tests, notebooks); yields its base URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="medmoe-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise RuntimeError(f"the server did not start on {host}:{port}")
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
