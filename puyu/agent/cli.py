"""`puyu agent run` and `puyu agent batch`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

from ..cli import CLIError
from .sandbox import SandboxConfig, SandboxError

MODEL_HELP = ("a model directory, registry name or 'puyu-tiny' (in-process engine); an OpenAI-compatible server URL "
              "(http://host:port); or replay:FILE.json (recorded replies, for regression runs)")


def register(subparsers) -> None:
    agent = subparsers.add_parser("agent", help="data-analysis agent runs (Lagent + sandboxed Python interpreter)")
    sub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    run = sub.add_parser("run", help="answer one question about data files; writes a run folder")
    run.add_argument("question", help="the question")
    run.add_argument("--file", action="append", default=[], metavar="PATH", help="input file (repeatable)")
    _common(run)
    run.set_defaults(func=cmd_run)
    batch = sub.add_parser("batch", help="run a tasks.jsonl file and score @name[value] answers")
    batch.add_argument("tasks", help="tasks JSONL file")
    batch.add_argument("--data-dir", help="folder the tasks' files are relative to (default: the tasks file's)")
    batch.add_argument("--concurrency", type=int, default=1, help="runs at once (default 1)")
    _common(batch)
    batch.set_defaults(func=cmd_batch)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL_OR_URL", help=MODEL_HELP)
    p.add_argument("--out", help="output folder (default: agent-runs/<time>)")
    p.add_argument("--max-turn", type=int, default=10, help="model turns per run (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per code cell (default 60)")
    p.add_argument("--memory-mb", type=int, default=2048, help="interpreter memory limit (default 2048)")
    p.add_argument("--output-limit", type=int, default=20000, help="bytes of output kept per cell (default 20000)")
    p.add_argument("--api-key", help="API key for a server URL")
    p.add_argument("--session-len", type=int, help="engine context length (in-process engine only)")
    p.add_argument("--device", default="cpu", help="engine device (in-process engine only)")


def _require_lagent() -> None:
    """The agent is an extra: say how to install it instead of printing an ImportError traceback."""
    import importlib.util

    if importlib.util.find_spec("lagent") is None:
        raise CLIError("the agent needs Lagent: pip install 'puyu[agent]' (lagent==0.2.4 and its pins)")


def _run_config(args: argparse.Namespace):
    from .runner import RunConfig

    sandbox = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb, output_limit_bytes=args.output_limit)
    return RunConfig(max_turn=args.max_turn, sandbox=sandbox)


def _gen_params(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}


def build_model_factory(args: argparse.Namespace) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    """(make_model(task_or_None), close) for --model; one shared model, except replays (one per run)."""
    spec: str = args.model
    if spec.startswith("replay:"):
        from .replay import ReplayModel, load_replay

        path = spec[len("replay:"):]
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: replay file does not exist")
        return (lambda task: ReplayModel(load_replay(path, getattr(task, "id", None)))), (lambda: None)
    if spec.startswith(("http://", "https://")):
        from .models import OpenAIServerModel

        model = OpenAIServerModel(spec, api_key=args.api_key)
    else:
        from ..config import EngineConfig
        from ..resolve import resolve_model_path
        from .models import EngineModel

        config = EngineConfig(session_len=args.session_len, device=args.device)
        model = EngineModel(model_path=str(resolve_model_path(spec)), engine_config=config)
    return (lambda task: model), model.close


def _out_dir(args: argparse.Namespace, kind: str) -> Path:
    return Path(args.out) if args.out else Path("agent-runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    _require_lagent()
    from .runner import run_analysis

    config, gen = _run_config(args), _gen_params(args)
    for f in args.file:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: input file does not exist")
    make_model, close = build_model_factory(args)
    try:
        result = run_analysis(make_model(None), args.question, args.file, _out_dir(args, "run"), config, **gen)
    except SandboxError as exc:
        raise CLIError(f"the interpreter sandbox could not start: {exc}") from None
    finally:
        close()
    print(f"run folder: {result.run_dir}")
    print(f"status: {result.summary} ({result.turns} turns, {result.duration_s} s)")
    print(f"answer: {result.answer or result.error}")
    return 0 if result.status == "answered" else 1


def cmd_batch(args: argparse.Namespace) -> int:
    _require_lagent()
    from .batch import load_tasks, run_batch

    config, gen = _run_config(args), _gen_params(args)
    tasks = load_tasks(args.tasks, args.data_dir)
    out = _out_dir(args, "batch")
    make_model, close = build_model_factory(args)
    try:
        summary = run_batch(tasks, make_model, out, config, concurrency=args.concurrency, **gen)
    finally:
        close()
    acc = summary["accuracy"]["by_question"]
    print(f"batch folder: {out}")
    print(f"tasks: {summary['tasks']}, status: {summary['status']}, accuracy by question: "
          f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}, wall time {summary['wall_s']} s")
    return 0 if all(k == "answered" for k in summary["status"]) else 1
