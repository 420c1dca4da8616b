"""Build the app's backends from command-line choices (kept apart from the CLI so tests can use them too)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config import EngineConfig
from .backends import ChatBackend, EngineBackend, OpenAIBackend

if TYPE_CHECKING:  # the agent extra may be missing
    from .analysis import AnalysisService


def make_chat_backend(model: Optional[str], api_url: Optional[str], api_key: Optional[str] = None,
                      model_name: Optional[str] = None, engine_config: Optional[EngineConfig] = None,
                      engine_backend: Optional[str] = None) -> ChatBackend:
    """`api_url`: an OpenAI-compatible server; otherwise the engine on MODEL (default puyu-tiny) in this process,
    native or TurboMind chosen as `puyu serve` does."""
    if api_url:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"--api-url: expected an http(s) URL, got {api_url!r}")
        backend = OpenAIBackend(api_url, api_key=api_key, model=model_name)
        backend.probe_model_id()  # the starting persona depends on the model (neutral unless InternLM)
        return backend
    from ..serve.backends import build_engine, choose_backend
    from ..serve.banner import engine_banner

    choice = choose_backend(engine_backend)
    if choice.note:
        print(f"puyu: {choice.note}; using the native engine", file=sys.stderr)
    engine = build_engine(model, choice.name, engine_config or EngineConfig())
    print(f"puyu: {engine_banner(engine)}", file=sys.stderr, flush=True)
    return EngineBackend(engine)


def make_analysis_service(backend: ChatBackend, agent_model: Optional[str] = None,
                          runs_root: Optional[Path] = None) -> Optional["AnalysisService"]:
    """The data-analysis agent: on the chat's model, or on `agent_model` ('replay:FILE' replays a recorded
    transcript, as `puyu agent run --model replay:FILE` does). None when the agent extra is not installed."""
    try:
        from .analysis import AnalysisService, default_runs_root
    except ImportError:
        return None
    if agent_model is None:
        return AnalysisService.for_backend(backend, runs_root)
    if not agent_model.startswith("replay:"):
        raise ValueError(f"--agent-model: only 'replay:FILE' is supported, got {agent_model!r}")
    from ..agent.replay import ReplayModel, load_replay

    path = Path(agent_model[len("replay:"):])
    replies = load_replay(path)  # checks the file now, not at the first run
    return AnalysisService(lambda: ReplayModel(list(replies)), runs_root or default_runs_root(),
                           description=f"replay of {path}")
