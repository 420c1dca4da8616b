"""Putting engine replicas on Ray Serve: starting (or joining) Ray, the deployment's options, its handle.

One deployment, `EngineReplica`, in a Serve application named `ReplicaOptions.app_name`; no Serve HTTP proxy is
started for it (the ingress is puyu's own server, in the calling process, so the API is one implementation). Each
replica needs one GPU (`--device cuda`) or `threads` CPUs. The model folder must exist at the same path on every node.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, cast

from ..config import EngineConfig
from .routing import DEFAULT_IMBALANCE, POLICIES

DEPLOYMENT = "EngineReplica"
START_ATTEMPTS = 3
INSTALL_HINT = "--replicas needs Ray Serve: pip install 'puyu[ray]'"


@dataclass
class ReplicaOptions:
    """How many replicas, where, and how requests are routed to them; autoscaling when `max_replicas` is set
    (between `min_replicas` and `max_replicas`, aiming at `target_ongoing_requests` per replica)."""

    replicas: int = 1
    ray_address: Optional[str] = None
    routing: str = "prefix"
    imbalance: int = DEFAULT_IMBALANCE
    threads: int = 1  # CPU threads (and Ray CPUs) per CPU replica
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: Optional[float] = None
    max_ongoing_requests: int = 64
    retries: int = 2
    app_name: str = "puyu"
    extra: dict[str, Any] = field(default_factory=dict)  # more deployment options, passed to Ray Serve as given

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas: must be at least 1, got {self.replicas}")
        if self.routing not in POLICIES:
            raise ValueError(f"--routing: {self.routing!r} is not one of {', '.join(POLICIES)}")
        if self.threads < 1:
            raise ValueError(f"--replica-threads: must be at least 1, got {self.threads}")
        if self.max_replicas is not None and self.max_replicas < (self.min_replicas or 1):
            raise ValueError(f"--max-replicas: {self.max_replicas} is below --min-replicas {self.min_replicas or 1}")
        if self.max_replicas is None and (self.min_replicas is not None or self.target_ongoing_requests is not None):
            raise ValueError("--min-replicas / --target-ongoing-requests: autoscaling also needs --max-replicas")

    @property
    def expected(self) -> int:
        """Replicas /health counts as the total when Ray has not placed them all yet."""
        return self.replicas if self.max_replicas is None else (self.min_replicas or 1)


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None


def start_ray(opts: ReplicaOptions, device: str) -> None:
    """Join `opts.ray_address`, or start a local Ray sized for the replicas (CPUs: replicas x threads)."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
    if opts.ray_address:
        try:
            ray.init(address=opts.ray_address, runtime_env=env, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as exc:  # unreachable, or refused (a cluster with token auth)
            ray.shutdown()
            raise ValueError(f"--ray-address {opts.ray_address}: cannot join the Ray cluster: "
                             f"{str(exc).strip().splitlines()[-1]} (a cluster with token authentication also "
                             f"needs RAY_AUTH_MODE=token and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        return
    count = opts.max_replicas or opts.replicas
    cpus = max(os.cpu_count() or 1, count * (1 if device.startswith("cuda") else opts.threads))
    for attempt in range(START_ATTEMPTS):
        try:
            ray.init(address="local", num_cpus=cpus, runtime_env=env, include_dashboard=False,
                     logging_level=logging.WARNING)  # "local": never join a cluster found on this machine
            return
        except Exception as exc:  # Ray gives its raylet a fixed 30 s to register, which a loaded machine can miss
            ray.shutdown()
            if attempt + 1 == START_ATTEMPTS or "timed out during startup" not in str(exc):
                raise RuntimeError(f"local Ray did not start: {exc}") from exc


def deployment_options(opts: ReplicaOptions, config: EngineConfig) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    gpu = config.device.startswith("cuda")
    options: dict[str, Any] = {
        "name": DEPLOYMENT, "max_ongoing_requests": opts.max_ongoing_requests,
        "ray_actor_options": {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": opts.threads},
        "request_router_config": RequestRouterConfig(
            request_router_class="puyu.scale.routers.PuyuRouter",  # type: ignore[arg-type]
            request_router_kwargs={"policy": opts.routing, "imbalance": opts.imbalance}),
        "health_check_period_s": 2, "health_check_timeout_s": 30,
    }
    if opts.max_replicas is not None:
        auto: dict[str, Any] = {"min_replicas": opts.min_replicas or 1, "max_replicas": opts.max_replicas}
        if opts.target_ongoing_requests is not None:
            auto["target_ongoing_requests"] = opts.target_ongoing_requests
        options["autoscaling_config"] = auto
    else:
        options["num_replicas"] = opts.replicas
    return {**options, **opts.extra}


def replica_config(config: EngineConfig, opts: ReplicaOptions) -> EngineConfig:
    """The engine config each replica runs: its GPU is the one Ray gives it (cuda:0 of its visible devices); a CPU
    replica uses `threads` threads."""
    import dataclasses

    if config.device.startswith("cuda"):
        return dataclasses.replace(config, device="cuda")
    return dataclasses.replace(config, num_threads=opts.threads)


def deploy(model_path: Path, config: EngineConfig, opts: ReplicaOptions) -> tuple[Any, str]:
    """Deploy the replicas (waits until they are up) -> (their DeploymentHandle, the stats board's name)."""
    from ray import serve

    from .replica import EngineReplica, stats_board

    board = f"{opts.app_name}-stats"
    stats_board(board)
    serve.start(proxy_location="Disabled")
    deployment = cast(Any, serve.deployment(EngineReplica)).options(**deployment_options(opts, config))
    app = deployment.bind(str(model_path), replica_config(config, opts), board)
    handle = serve.run(app, name=opts.app_name, route_prefix=None)
    return handle, board


def replica_states(app_name: str, expected: int) -> tuple[int, int]:
    """(replicas running, replicas in all) of the app's engine deployment, as Ray Serve reports them."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0, expected
    states = {str(k): int(v) for k, v in app.deployments[DEPLOYMENT].replica_states.items()}
    up = states.get("RUNNING", 0)
    return up, max(expected, sum(states.values()))
