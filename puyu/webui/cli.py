"""`puyu webui [MODEL | --api-url URL] [--server-name 127.0.0.1] [--server-port 6006] [engine options]`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..serve.options import add_engine_args

    p = subparsers.add_parser("webui", help="Gradio web UI: chat with personas, data-analysis agent",
                              description="Start the web UI on the engine in this process (MODEL, default "
                                          "puyu-tiny) or on any OpenAI-compatible server (--api-url).")
    add_engine_args(p)  # MODEL, --backend, --config and the engine options, as `puyu serve` has them
    p.add_argument("--api-url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:23333")
    p.add_argument("--api-key", default=None, help="API key for --api-url")
    p.add_argument("--model-name", default=None, help="model to request from --api-url (default: its first)")
    p.add_argument("--server-name", default="127.0.0.1", help="host to bind (default 127.0.0.1)")
    p.add_argument("--server-port", type=int, default=6006, help="port (default 6006)")
    p.add_argument("--personas", type=Path, default=None, help="persona directory (default: configs/personas)")
    p.add_argument("--agent-model", default=None, metavar="replay:FILE",
                   help="drive the data-analysis agent with a recorded transcript instead of the chat's model")
    p.add_argument("--runs-dir", type=Path, default=None, help="where agent runs are written (default: a temp dir)")
    p.add_argument("--no-agent", action="store_true", help="leave out the data-analysis tab")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the web UI needs Gradio: pip install 'puyu[webui]' (and 'puyu[agent]' for data analysis)")
    from ..resolve import check_model_path
    from ..serve.options import engine_config_from_args
    from ..serve.ports import check_bindable

    # every check that needs neither the model nor Gradio comes first, so a mistake is reported at once
    if args.model and args.api_url:
        raise ValueError("give either MODEL (the engine in this process) or --api-url (a server), not both")
    check_model_path(args.model)
    engine_config = None if args.api_url else engine_config_from_args(args)
    from ..personas import load_personas

    personas = load_personas(args.personas)
    check_bindable(args.server_name, args.server_port)
    from .app import AppConfig, build_app, launch
    from .services import make_analysis_service, make_chat_backend

    backend = make_chat_backend(args.model, args.api_url, args.api_key, args.model_name, engine_config,
                                args.backend)
    try:
        analysis = None if args.no_agent else make_analysis_service(backend, args.agent_model, args.runs_dir)
        config = AppConfig(personas=personas, analysis=analysis)
        app = build_app(backend, config)
        url = launch(app, args.server_name, args.server_port, config)
        print(f"puyu webui: {backend.description} on {url}", flush=True)
        app.block_thread()
    finally:
        backend.close()
    return 0
