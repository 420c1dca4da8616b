"""The ingress: puyu's API server (create_app, unchanged) over a `RayEngine`, with /health reporting replicas.

`/health` answers 200 `{"status": "ok" | "degraded", "replicas": {"up", "total", "live": {id: counters}}}` while at
least one replica runs, and 503 `{"status": "unavailable", ...}` when none does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ..config import EngineConfig
from ..serve.api_server import create_app
from .deploy import ReplicaOptions, deploy, replica_states
from .remote import RayEngine


def connect(model_path: Path, config: EngineConfig, opts: ReplicaOptions) -> RayEngine:
    """Deploy the replicas (Ray must be started) and return the engine that routes to them."""
    import ray

    from .replica import BOARD_NAMESPACE

    handle, board_name = deploy(model_path, config, opts)
    info = handle.info.remote().result(timeout_s=120)
    board = ray.get_actor(board_name, namespace=BOARD_NAMESPACE)
    return RayEngine(handle, info, board, lambda: replica_states(opts.app_name, opts.expected), opts.retries)


def create_replicated_app(engine: RayEngine, **options: Any) -> FastAPI:
    """`create_app(engine, **options)` with /health replaced by the replicas' view."""
    app = create_app(engine, **options)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
    served = app.state.model_name

    @app.get("/health")
    async def health() -> JSONResponse:
        replicas = engine.replicas()
        up, total = replicas["up"], replicas["total"]
        status = "unavailable" if up == 0 else "ok" if up >= total else "degraded"
        return JSONResponse({"status": status, "model": served, "replicas": replicas},
                            status_code=503 if up == 0 else 200)

    return app


def shutdown(engine: RayEngine, opts: ReplicaOptions) -> None:
    """Stop reading stats; remove the app from a cluster we joined, or stop the local Ray we started."""
    import ray
    from ray import serve

    engine.close()
    try:
        if opts.ray_address:
            serve.delete(opts.app_name)
            ray.kill(engine.board)  # detached (a `serve deploy`ed app's must outlive its creator); ours need not
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
