"""`puyu webui [MODEL | --api-url URL] [--server-name 127.0.0.1] [--server-port 6006] [engine options]`."""
from __future__ import annotations

import argparse
from pathlib import Path
from ..config import EngineConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("webui", help="Gradio web UI: chat with personas, data-analysis agent",
                              description="Start the web UI on the in-process engine (MODEL) or on any "
                                          "OpenAI-compatible server (--api-url).")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF directory, workspace, registry name or puyu-tiny (default: puyu-tiny)")
    p.add_argument("--api-url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:23333")
    p.add_argument("--api-key", default=None, help="API key for --api-url")
    p.add_argument("--model-name", default=None, help="model name to request from --api-url (default: its first)")
    p.add_argument("--server-name", default="127.0.0.1")
    p.add_argument("--server-port", type=int, default=6006)
    p.add_argument("--personas", type=Path, default=None, help="persona directory (default: configs/personas)")
    p.add_argument("--no-agent", action="store_true", help="leave out the data-analysis tab")
    e = p.add_argument_group("engine options (in-process engine only)")
    e.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8], help="KV cache quantisation")
    e.add_argument("--session-len", type=int, default=None)
    e.add_argument("--cache-max-entry-count", type=float, default=0.5)
    e.add_argument("--max-batch-size", type=int, default=64)
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--tp", type=int, default=1)
    p.set_defaults(func=run)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    count = args.cache_max_entry_count
    return EngineConfig(quant_policy=args.quant_policy, session_len=args.session_len,
                        cache_max_entry_count=int(count) if count >= 1 else count,
                        max_batch_size=args.max_batch_size, device=args.device, dtype=args.dtype, tp=args.tp)


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError
    from .app import AppConfig, build_app, launch
    from .personas import load_personas
    from .services import make_analysis_service, make_chat_backend

    if args.model and args.api_url:
        raise CLIError("give either MODEL (in-process engine) or --api-url (a server), not both")
    if not 0 < args.server_port < 65536:
        raise CLIError(f"--server-port: {args.server_port} is not a TCP port")
    personas = load_personas(args.personas)
    backend = make_chat_backend(args.model, args.api_url, args.api_key, args.model_name,
                                None if args.api_url else engine_config(args))
    analysis = None if args.no_agent else make_analysis_service(backend)
    app = build_app(backend, AppConfig(personas=personas, analysis=analysis))
    url = launch(app, args.server_name, args.server_port)
    print(f"puyu webui: {backend.description} on {url}", flush=True)
    try:
        app.block_thread()
    finally:
        backend.close()
    return 0
