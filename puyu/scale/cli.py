"""`puyu serve --replicas N` / `--ray-address ADDRESS`: the flags, and the run (Ray up, replicas deployed, the API
server in this process, everything torn down on exit)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import EngineConfig
from .routing import DEFAULT_IMBALANCE, POLICIES


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("replicas (Ray Serve; pip install 'puyu[ray]')")
    group.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="serve N engine replicas on Ray Serve behind this one endpoint (local Ray unless "
                            "--ray-address); each takes one GPU with --device cuda, else --replica-threads CPUs")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="deploy the replicas onto this Ray cluster (e.g. auto, or HOST:6379) instead of a "
                            "local one; the model folder must exist at the same path on every node")
    group.add_argument("--routing", default="prefix", choices=POLICIES,
                       help="how requests pick a replica: prefix (the replica holding the longest cached prefix, "
                            "else the least loaded; default), least-loaded, round-robin")
    group.add_argument("--routing-imbalance", type=int, default=DEFAULT_IMBALANCE, metavar="N",
                       help=f"prefix routing gives way to the least-loaded replica when the prefix holder has N "
                            f"more requests in flight (default {DEFAULT_IMBALANCE})")
    group.add_argument("--replica-threads", type=int, default=1, metavar="N",
                       help="CPU threads (and Ray CPUs) per CPU replica (default 1)")
    group.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscaling: fewest replicas")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N",
                       help="autoscaling: most replicas (turns Ray Serve's autoscaler on)")
    group.add_argument("--target-ongoing-requests", type=float, default=None, metavar="N",
                       help="autoscaling: requests in flight per replica the autoscaler aims at")


def wants_replicas(args: argparse.Namespace) -> bool:
    return args.replicas is not None or args.ray_address is not None or args.max_replicas is not None


def replica_options(args: argparse.Namespace) -> Any:
    from .deploy import ReplicaOptions

    if getattr(args, "backend", None) == "turbomind":
        raise ValueError("--backend turbomind: --replicas runs the native engine in each replica")
    opts = ReplicaOptions(replicas=args.replicas or 1, ray_address=args.ray_address, routing=args.routing,
                          imbalance=args.routing_imbalance, threads=args.replica_threads,
                          min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                          target_ongoing_requests=args.target_ongoing_requests)
    opts.validate()
    return opts


def run_replicated(args: argparse.Namespace, config: EngineConfig, app_options: dict[str, Any]) -> int:
    """Serve through replicas until interrupted; `app_options` are create_app's keyword arguments."""
    from .deploy import require_ray

    opts = replica_options(args)
    require_ray()
    from ..resolve import resolve_model_path
    from ..serve.api_server import run_server
    from .deploy import start_ray
    from .server import connect, create_replicated_app, shutdown

    path = resolve_model_path(args.model)
    start_ray(opts, config.device)
    engine = connect(path, config, opts)
    try:
        app = create_replicated_app(engine, **app_options)
        where = f"Ray cluster {opts.ray_address}" if opts.ray_address else "local Ray"
        print(f"puyu serve: {app.state.model_name} on {opts.expected} replica(s) ({where}, {opts.routing} "
              f"routing) on http://{args.server_name}:{args.server_port}"
              f"{' (API keys required)' if args.api_keys else ''}", file=sys.stderr, flush=True)
        run_server(app, args.server_name, args.server_port, args.log_level)
    finally:
        shutdown(engine, opts)
    return 0
