"""ASGI middleware: the request guard (Host allow-list, Origin check, framing, Content-Type, body-size limit and body
read timeout, all before the app sees the request), the API-key check (before the body is read, so a bad key is a 401
whatever the body) and the per-endpoint request counter of /metrics."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from .errors import APIError
from .metrics import ServerMetrics

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
PROTECTED_PREFIX = "/v1"
OPEN_PATHS = ("/health",)  # answered without an API key (load-balancer probes); everything else needs one
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0  # seconds between two chunks of a request body
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def _header(scope: dict, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1").strip()
    return None


def host_name(host: str) -> str:
    """'example.com:80' -> 'example.com', '[::1]:8000' -> '::1' (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def default_allowed_hosts(server_name: str) -> Optional[list[str]]:
    """Host names accepted when --allowed-hosts is not given: the loopback names and the bound name; a server bound to
    every interface (0.0.0.0, ::) accepts any Host (None), since its clients may use any of the machine's names."""
    if host_name(server_name) in ANY_ADDRESS:
        return None
    return sorted({*LOCAL_HOSTS, host_name(server_name)})


def tenant(scope: Mapping[str, Any]) -> Optional[str]:
    """Who sent the request, as the API-key check established it (a digest of the key); None without keys."""
    return scope.get("state", {}).get("puyu_tenant")


def _bearer(scope: dict) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class APIKeyMiddleware:
    """Every request but /health (and CORS preflights) needs `Authorization: Bearer <key>` with one of `keys` (when any
    are configured): /v1/*, /metrics, /docs, /openapi.json alike."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: dict) -> bool:
        token = _bearer(scope).encode()
        return any(hmac.compare_digest(token, k) for k in self.keys)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] not in OPEN_PATHS \
                and scope.get("method") != "OPTIONS" and not self._allowed(scope):
            missing = not _bearer(scope)
            err = APIError(401, "missing API key: send 'Authorization: Bearer <key>'" if missing else
                           "invalid API key", code="invalid_api_key")
            await err.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        if scope["type"] == "http" and self.keys:
            digest = hashlib.sha256(_bearer(scope).encode()).hexdigest()[:32]
            scope.setdefault("state", {})["puyu_tenant"] = digest
        await self.app(scope, receive, send)


class RequestCountMiddleware:
    """Counts answered API requests by endpoint and status code."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                 "/metrics")

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


class RequestGuardMiddleware:
    """Checks made before the app sees a request:

    - Host: one of `allowed_hosts` (None or '*': any), else 400 (DNS rebinding: a page on evil.example that resolves
      to 127.0.0.1 sends `Host: evil.example`).
    - Origin: a browser request from another origin must be in `allowed_origins` ('*': any), else 403, even for the
      "simple" requests that CORS lets through without a preflight; same-origin requests (/docs) pass.
    - framing: Content-Length together with Transfer-Encoding is a 400 (request smuggling).
    - POST bodies are JSON: Content-Type application/json (or none, as some clients send) else 415; the body is read
      here, at most `max_body_bytes` (413 beyond, from Content-Length at once), with at most `body_timeout` seconds
      between chunks (408), and handed to the app whole.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 allowed_hosts: Optional[Sequence[str]] = None, allowed_origins: Sequence[str] = (),
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hosts = None if allowed_hosts is None or "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}
        self.any_origin = "*" in allowed_origins
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.body_timeout = body_timeout

    def _origin_allowed(self, origin: str, host: Optional[str]) -> bool:
        origin = origin.rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        parts = urlsplit(origin)
        return bool(host) and parts.scheme in ("http", "https") and parts.netloc == (host or "").lower()

    def _reject(self, scope: dict) -> Optional["APIError"]:
        host = _header(scope, b"host")
        if self.hosts is not None and host_name(host or "") not in self.hosts:
            return APIError(400, f"invalid Host header {host!r}: this server answers "
                            f"{', '.join(sorted(self.hosts))} (see --allowed-hosts)", code="invalid_host")
        origin = _header(scope, b"origin")
        if origin is not None and origin != "null" and not self._origin_allowed(origin, host):
            return APIError(403, f"cross-origin request from {origin!r} refused (see --allowed-origins)",
                            code="origin_not_allowed")
        if origin == "null" and not self.any_origin:
            return APIError(403, "cross-origin request from an opaque origin refused (see --allowed-origins)",
                            code="origin_not_allowed")
        length = _header(scope, b"content-length")
        if length is not None and _header(scope, b"transfer-encoding") is not None:
            return APIError(400, "Content-Length and Transfer-Encoding together are not allowed",
                            code="invalid_framing")
        if scope.get("method") == "POST":
            ctype = _header(scope, b"content-type")
            if ctype is not None and ctype.split(";", 1)[0].strip().lower() != "application/json":
                return APIError(415, f"unsupported Content-Type {ctype!r}: send the body as application/json",
                                code="unsupported_media_type")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                return self._too_large() if length.isdigit() else \
                    APIError(400, f"invalid Content-Length {length!r}", code="invalid_framing")
        return None

    def _too_large(self) -> "APIError":
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes "
                        "(see --max-request-bytes)", code="request_too_large")

    async def _read_body(self, receive: Any) -> tuple[Optional[bytes], Optional["APIError"]]:
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                return None, APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                      code="request_timeout")
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._reject(scope)
        if err is not None:
            await err.response(headers={"Connection": "close"})(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body, err = await self._read_body(receive)
        if err is not None:
            await err.response(headers={"Connection": "close"})(scope, receive, send)
            return
        if body is None:  # the client left while sending
            return
        # some clients send no Content-Type: the body is JSON all the same
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
