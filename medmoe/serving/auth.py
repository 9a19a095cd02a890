"""An API key for the server: `Authorization: Bearer KEY` on every /v1/ endpoint.

The web page (/) and /health stay open, so the page can load and ask for the key, and a
load balancer can probe the process. The key is compared in constant time."""

from __future__ import annotations

import hmac
import ipaddress

from .http_errors import HTTPProblem


class BearerAuth:
    """ASGI middleware answering 401 (OpenAI shape, `WWW-Authenticate: Bearer`) to /v1/ requests
    without the key."""

    def __init__(self, app, api_key: str):
        if not api_key:
            raise ValueError("BearerAuth needs a non-empty api_key")
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and is_protected(scope["path"]):
            problem = self.check(dict(scope["headers"]).get(b"authorization"))
            if problem is not None:
                return await problem.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, header: bytes | None) -> HTTPProblem | None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if header is None:
            return HTTPProblem(401, "this server needs an API key: send the header Authorization: Bearer KEY",
                               headers=challenge)
        scheme, _, token = header.strip().partition(b" ")
        # compare_digest takes the same time wherever the strings differ: the key cannot be guessed byte by byte.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return HTTPProblem(401, "invalid API key", headers=challenge)
        return None


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it reaches the network
