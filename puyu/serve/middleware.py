"""ASGI middleware: API-key check on /v1 (before the body is read, so a bad key is a 401 whatever the body) and the
per-endpoint request counter of /metrics."""
from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable, Sequence

from .errors import APIError
from .metrics import ServerMetrics

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
PROTECTED_PREFIX = "/v1"


def _bearer(scope: dict) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class APIKeyMiddleware:
    """Requests to /v1/* need `Authorization: Bearer <key>` with one of `keys` (when any are configured)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: dict) -> bool:
        token = _bearer(scope).encode()
        return any(hmac.compare_digest(token, k) for k in self.keys)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED_PREFIX) \
                and scope.get("method") != "OPTIONS" and not self._allowed(scope):
            missing = not _bearer(scope)
            err = APIError(401, "missing API key: send 'Authorization: Bearer <key>'" if missing else
                           "invalid API key", code="invalid_api_key")
            await err.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestCountMiddleware:
    """Counts answered API requests by endpoint and status code."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.ENDPOINTS else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class JSONBodyMiddleware:
    """POST bodies on /v1 are JSON whatever Content-Type says (curl -d sends a form type; LMDeploy's clients none),
    so a malformed body is always reported as malformed JSON, never as a type mismatch."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope["path"].startswith(PROTECTED_PREFIX):
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
