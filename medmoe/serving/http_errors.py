"""Every error the server answers, as an OpenAI error object:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

`HTTPProblem` is what handlers raise; `install_error_handlers` gives the framework's own errors
(unknown path 404, wrong method 405, 422) the same shape, and `CatchAll` turns an exception
nothing else handled into a logged 500 in that shape instead of a plain-text one."""

from __future__ import annotations

import json
import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("medmoe.serving.server")

# The `code` of errors that have one (OpenAI's own where it has one).
STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                415: "unsupported_media_type", 422: "invalid_request", 500: "internal_error", 503: "server_busy",
                504: "timeout"}


class HTTPProblem(Exception):
    """An error answered with `status` and an OpenAI-style error body; `param` names the field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        # A message quoting request text may hold lone surrogates, which UTF-8 JSON cannot carry.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.code = code if code is not None else STATUS_CODES.get(status)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status == 503:
            headers.setdefault("Retry-After", "1")
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)

    def event(self) -> str:
        """The error as one server-sent event (a stream that already started cannot change status)."""
        return f"data: {json.dumps(self.body())}\n\n"


def _framework_error(request, err: StarletteHTTPException) -> JSONResponse:
    message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
    if err.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}; see GET /v1/models, POST /v1/chat/completions"
    elif err.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return HTTPProblem(err.status_code, message, headers=getattr(err, "headers", None)).response()


def _validation_error(request, err: RequestValidationError) -> JSONResponse:
    first = (err.errors() or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return HTTPProblem(422, f"{where}: {first.get('msg', 'invalid request')}", param=where or None).response()


def install_error_handlers(app) -> None:
    async def problem(request, err: HTTPProblem):
        return err.response()

    async def framework(request, err: StarletteHTTPException):
        return _framework_error(request, err)

    async def validation(request, err: RequestValidationError):
        return _validation_error(request, err)

    app.add_exception_handler(HTTPProblem, problem)
    app.add_exception_handler(StarletteHTTPException, framework)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_middleware(CatchAll)


class CatchAll:
    """ASGI middleware: an unhandled exception is logged with its traceback and answered with a
    500 in the OpenAI shape (when the response has not started yet). It should never fire."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                problem = HTTPProblem(500, "internal server error; the server log has the details", "server_error")
                await problem.response()(scope, receive, send)
