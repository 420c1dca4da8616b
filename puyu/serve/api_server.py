"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) on top of any engine that follows the AsyncEngine contract.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /tokenize, POST /detokenize,
GET /health, GET /metrics, and POST /v1/load_lora_adapter, /v1/unload_lora_adapter (lora_api.py: `model` may name a
loaded LoRA adapter).
Every error is OpenAI's error JSON with the matching status; an exception inside one request answers that request
with a 500 and leaves the server and the other requests running.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.client import EngineClient
from .chat_api import ChatCompletion
from .completions_api import Completion
from .errors import APIError, from_validation_errors
from .lora_api import SCOPE_KEY as ADAPTER_SCOPE_KEY
from .lora_api import adapter_cards, adapter_for, add_lora_routes
from .http_protocol import DEFAULT_HEADER_TIMEOUT, with_header_timeout
from .metrics import CONTENT_TYPE, ServerMetrics
from .middleware import (DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, APIKeyMiddleware, RequestCountMiddleware,
                         RequestGuardMiddleware)
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ClientGone, now
from .tokenize_api import add_routes as add_tokenize_routes

log = logging.getLogger("puyu.serve")
CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it, the log does


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI could not read the body at all (e.g. not UTF-8)
            message = f"the request body cannot be read as JSON ({message})"
        return APIError(exc.status_code, message, code=code).response(headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()


def create_app(engine: EngineClient, model_name: Optional[str] = None, api_keys: Sequence[str] = (),
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               allowed_hosts: Optional[Sequence[str]] = ("localhost", "127.0.0.1", "::1"),
               allowed_origins: Sequence[str] = (), body_timeout: float = DEFAULT_BODY_TIMEOUT,
               allowed_local_media_path: Optional[Path] = None, allow_runtime_lora: bool = False) -> FastAPI:
    """The ASGI app serving `engine` under `model_name` (default: the engine's). `api_keys`: required keys on every
    path but /health. `max_request_bytes`: the largest request body (413 beyond). `allowed_hosts`: accepted Host
    names (None or '*': any). `allowed_origins`: browser origins allowed besides the server's own ('*': any), with
    CORS headers for them. `body_timeout`: seconds allowed between two chunks of a request body (408 beyond).
    `allowed_local_media_path`: the folder image parts may name local files in (None: no local files).
    `allow_runtime_lora`: mount /v1/load_lora_adapter and /v1/unload_lora_adapter (they read server-side paths).
    The caller owns the engine (and closes it)."""
    served = model_name or engine.model_name
    metrics = ServerMetrics(getattr(engine, "stats", None))

    app = FastAPI(title="puyu", description="OpenAI-compatible API for InternLM chat models", version=__version__)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, served
    app.state.allowed_local_media_path = (None if allowed_local_media_path is None
                                          else Path(allowed_local_media_path).resolve())
    _install_error_handlers(app)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        card = {"id": served, "object": "model", "created": now(), "owned_by": "puyu",
                "max_model_len": int(engine.session_len)}
        return {"object": "list", "data": [card, *adapter_cards(engine, served)]}

    async def answer(kind: Any, body: Any, request: Request) -> Response:
        # `model` picks the base model or a LoRA adapter (vLLM's convention); the answer echoes it
        request.scope[ADAPTER_SCOPE_KEY] = adapter_for(engine, served, body.model)
        call = kind(body, engine, metrics, body.model)
        log.info("%s user=%s session_id=%s", call.id, body.user, body.session_id)
        return await call.respond(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer(ChatCompletion, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer(Completion, body, request)

    def check_model(name: str) -> None:  # /tokenize accepts the base model's name or a loaded adapter's
        adapter_for(engine, served, name)

    add_tokenize_routes(app, engine, check_model)
    if allow_runtime_lora:
        add_lora_routes(app, engine, served)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine serves; 503 once its thread has stopped (a load balancer then takes us out)."""
        alive = getattr(engine, "is_alive", None)
        if alive is not None and not alive():
            return JSONResponse({"status": "engine stopped", "model": served}, status_code=503)
        return JSONResponse({"status": "ok", "model": served})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(APIKeyMiddleware, keys=list(api_keys))
    if allowed_origins:  # CORS as vLLM: only when origins are configured
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestGuardMiddleware, max_body_bytes=max_request_bytes,
                       allowed_hosts=None if allowed_hosts is None else list(allowed_hosts),
                       allowed_origins=list(allowed_origins), body_timeout=body_timeout)
    app.add_middleware(RequestCountMiddleware, metrics=metrics)
    return app


def uvicorn_options(header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> dict[str, Any]:
    """How puyu runs uvicorn: request line + headers at most 64 KiB and `header_timeout` seconds (slowloris; the body
    has its own limit and timeout), idle keep-alive connections closed after 30 s."""
    return {"http": with_header_timeout(header_timeout), "h11_max_incomplete_event_size": 64 * 1024,
            "timeout_keep_alive": 30}


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options())
