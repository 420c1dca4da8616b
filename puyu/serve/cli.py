"""`puyu serve` (OpenAI-compatible API server) and `puyu chat` (terminal chat)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..config import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_K,
                      DEFAULT_TOP_P, EngineConfig, GenerationConfig, default_repetition_penalty)
from ..resolve import check_model_path
from ..scale.cli import add_replica_args, wants_replicas
from .options import add_engine_args, engine_config_from_args
from .ports import check_bindable

DEFAULT_HOST = "127.0.0.1"  # LMDeploy listens on 0.0.0.0; pass --server-name 0.0.0.0 to listen on every interface
DEFAULT_PORT = 23333


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="OpenAI-compatible API server",
        description="Serve MODEL over an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, "
                    "/health, /metrics. Listens on 127.0.0.1 unless --server-name says otherwise.")
    add_engine_args(serve)
    serve.add_argument("--server-name", default=DEFAULT_HOST, help=f"host to bind (default {DEFAULT_HOST})")
    serve.add_argument("--server-port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                       help="accepted API keys (Authorization: Bearer KEY); none: no authentication")
    serve.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024, metavar="N",
                       help="largest request body in bytes; larger ones are answered 413 (default 8 MiB)")
    serve.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                       help="Host header names accepted ('*': any; default: localhost, 127.0.0.1, ::1 and "
                            "--server-name, or any when bound to 0.0.0.0 / ::)")
    serve.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="browser origins allowed to call the API, with CORS headers ('*': any; default: none "
                            "but the server's own)")
    serve.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                       help="image parts may name local files under DIR (default: data: URLs only)")
    serve.add_argument("--lora", nargs="+", action="extend", default=None, metavar="NAME=PATH",
                       help="PEFT LoRA adapters to load; a request picks one by its `model`")
    serve.add_argument("--allow-runtime-lora", action="store_true",
                       help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default: a "
                            "client could make the server read any local directory; vLLM asks for the same opt-in)")
    serve.add_argument("--model-name", default=None, help="name served in /v1/models (default: the model folder's)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_replica_args(serve)
    serve.set_defaults(func=run_serve)

    chat = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Chat with MODEL in the terminal: streaming replies, multi-turn history. "
                    "Commands: /reset, /exit (or /quit, Ctrl-D), /help.")
    add_engine_args(chat)
    who = chat.add_mutually_exclusive_group()
    who.add_argument("--system", default=None, help="system prompt")
    who.add_argument("--persona", default=None,
                     help="persona from configs/personas (file stem or name, e.g. bajie or 八戒) or a YAML file")
    chat.add_argument("--image", type=Path, default=None, metavar="FILE",
                      help="an image for a vision model (XComposer2-VL), sent with the first question")
    # the same defaults as the server's and the web UI's (config.py)
    chat.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                      help=f"longest reply in tokens (default {DEFAULT_MAX_NEW_TOKENS}); a cut reply is marked")
    chat.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                      help=f"0: greedy (default {DEFAULT_TEMPERATURE})")
    chat.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=f"default {DEFAULT_TOP_P}")
    chat.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"0: no cut (default {DEFAULT_TOP_K})")
    chat.add_argument("--repetition-penalty", type=float, default=None,
                      help=f"default {DEFAULT_REPETITION_PENALTY} when sampling, 1.0 (none) when greedy")
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=run_chat)


def lora_modules(specs: Optional[list[str]]) -> dict[str, str]:
    """`--lora NAME=PATH ...` -> {name: path}; each PATH must be a directory (errors name the option and value)."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora: {spec!r} must be NAME=PATH")
        if name in adapters:
            raise ValueError(f"--lora: adapter name {name!r} is given twice")
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"--lora: {name}={path}: {path} is not a directory")
        adapters[name] = path
    return adapters


def _engine(args: argparse.Namespace, config: EngineConfig, adapters: Optional[dict[str, str]] = None):
    from .backends import build_engine, choose_backend
    from .banner import engine_banner

    # LoRA adapters run on the native engine: without an explicit --backend they choose it
    choice = choose_backend("native" if adapters and args.backend is None else args.backend)
    if choice.note:
        print(f"puyu: {choice.note}; using the native engine", file=sys.stderr)
    engine = build_engine(args.model, choice.name, config, adapters)
    print(f"puyu: {engine_banner(engine)}", file=sys.stderr, flush=True)
    return engine, choice.name


def run_serve(args: argparse.Namespace) -> int:
    # every check that needs no model comes first, before torch is imported, so a mistake is reported at once
    if args.max_request_bytes < 1024:
        raise ValueError(f"--max-request-bytes: {args.max_request_bytes} is too small (at least 1024)")
    check_model_path(args.model)
    adapters = lora_modules(args.lora)
    config = engine_config_from_args(args)
    check_bindable(args.server_name, args.server_port)
    from .api_server import create_app, run_server
    from .middleware import default_allowed_hosts

    hosts = args.allowed_hosts if args.allowed_hosts is not None else default_allowed_hosts(args.server_name)
    media = args.allowed_local_media_path
    if media is not None and not media.is_dir():
        raise ValueError(f"--allowed-local-media-path: {media} is not a directory")
    app_options = dict(model_name=args.model_name, api_keys=args.api_keys or (),
                       max_request_bytes=args.max_request_bytes, allowed_hosts=hosts,
                       allowed_origins=args.allowed_origins or (), allowed_local_media_path=media,
                       allow_runtime_lora=args.allow_runtime_lora)
    if wants_replicas(args):
        from ..scale.cli import run_replicated

        return run_replicated(args, config, app_options)
    engine, backend = _engine(args, config, adapters)
    app = create_app(engine, **app_options)
    print(f"puyu serve: {app.state.model_name} ({backend} backend) on http://{args.server_name}:{args.server_port}"
          f"{' (API keys required)' if args.api_keys else ''}", file=sys.stderr, flush=True)
    try:
        run_server(app, args.server_name, args.server_port, args.log_level)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    return 0


def chat_generation_config(args: argparse.Namespace) -> GenerationConfig:
    """`puyu chat`'s sampling options; with no flags given, the server's and the web UI's defaults."""
    penalty = args.repetition_penalty
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, random_seed=args.seed,
                            repetition_penalty=default_repetition_penalty(args.temperature) if penalty is None
                            else penalty)


def _chat_image(path: Path):
    """The decoded image of --image (errors name the file)."""
    from ..engine.multimodal import load_image

    return load_image(path, "--image")


def run_chat(args: argparse.Namespace) -> int:
    from ..personas import Persona, language_note
    from .chat import TerminalChat, find_persona

    persona = find_persona(args.persona) if args.persona else Persona(system=args.system or "")
    gen = chat_generation_config(args)
    check_model_path(args.model)
    image = _chat_image(args.image) if args.image is not None else None
    engine, _ = _engine(args, engine_config_from_args(args))
    note = language_note(persona, getattr(engine, "tokenizer", None))
    if note:  # the persona still runs: the user chose it, and may know better
        print(f"puyu: note: {note}", file=sys.stderr, flush=True)
    try:
        if image is not None and not getattr(getattr(engine, "spec", None), "vision", ""):
            raise ValueError(f"--image: model {engine.model_name} has no vision (it takes text only)")
        return TerminalChat(engine, gen, persona, image=image).run()
    finally:
        if hasattr(engine, "close"):
            engine.close()
