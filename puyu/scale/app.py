"""A Ray Serve application for Ray's own tooling: `serve run puyu.scale.app:build model=PATH` or a `serve deploy`
config (configs/ray/puyu-serve.yaml) naming `import_path: puyu.scale.app:build` with `args`.

Two deployments: `EngineReplica` (the engines, routed by puyu's router) and `PuyuIngress`, which serves puyu's API
app (create_app over a RayEngine, the same app `puyu serve --replicas` runs) behind Ray Serve's HTTP proxy. Here the
proxy, not puyu's uvicorn settings, owns the connection (its own header and keep-alive limits).

`args`: `model` (path or registry name, present at the same path on every node), `engine` (EngineConfig fields),
`replicas`, `routing`, `imbalance`, `threads`, `min_replicas`, `max_replicas`, `target_ongoing_requests`,
`max_ongoing_requests`, `retries` (ReplicaOptions), `api_keys`, `model_name`, `allowed_hosts` (default: any, since
the proxy fronts it).
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, cast

from ray import serve

from ..config import EngineConfig
from ..resolve import resolve_model_path
from .deploy import DEPLOYMENT, ReplicaOptions, deployment_options, replica_config

API_ARGS = ("api_keys", "model_name", "allowed_hosts", "allowed_origins", "max_request_bytes")


def _ingress_app(opts: ReplicaOptions, api: dict[str, Any]) -> Callable[[], Any]:
    """The builder Ray Serve calls on the ingress replica: the handle, one replica's info, the API app."""

    def build_app() -> Any:
        import ray

        from .deploy import replica_states
        from .remote import RayEngine
        from .replica import BOARD_NAMESPACE
        from .server import create_replicated_app

        app_name = serve.get_replica_context().app_name
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app_name)
        with ThreadPoolExecutor(1) as pool:  # a blocking call, kept off the replica's event loop
            info = pool.submit(lambda: handle.info.remote().result(timeout_s=300)).result()
        board = ray.get_actor(f"{opts.app_name}-stats", namespace=BOARD_NAMESPACE)
        engine = RayEngine(handle, info, board, lambda: replica_states(app_name, opts.expected), opts.retries)
        return create_replicated_app(engine, **api)

    return build_app


class PuyuIngress:
    """Holds nothing: the API app is built by `_ingress_app`; `replicas` is bound only to put them in the app."""

    def __init__(self, replicas: Any):
        self.replicas = replicas


def build(args: dict[str, Any]) -> Any:
    """The Serve application for `args` (see the module docstring)."""
    from .replica import EngineReplica, stats_board

    fields = {f.name for f in dataclasses.fields(ReplicaOptions)}
    opts = ReplicaOptions(**{k: v for k, v in args.items() if k in fields})
    opts.validate()
    config = EngineConfig.from_dict(dict(args.get("engine") or {}))
    path = resolve_model_path(args.get("model"))
    api = {k: args[k] for k in API_ARGS if k in args}
    api.setdefault("allowed_hosts", None)
    board = f"{opts.app_name}-stats"
    stats_board(board)
    replicas = cast(Any, serve.deployment(EngineReplica)).options(
        **deployment_options(opts, config)).bind(str(path), replica_config(config, opts), board)
    ingress = cast(Any, serve.deployment(serve.ingress(_ingress_app(opts, api))(PuyuIngress)))
    return ingress.options(name="PuyuIngress", ray_actor_options={"num_cpus": 0}).bind(replicas)
