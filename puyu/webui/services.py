"""Build the app's backends from command-line choices (kept apart from the CLI so tests can use them too)."""
from __future__ import annotations

from typing import Optional

from ..config import EngineConfig
from .backends import ChatBackend, EngineBackend, OpenAIBackend


def make_chat_backend(model: Optional[str], api_url: Optional[str], api_key: Optional[str] = None,
                      model_name: Optional[str] = None, engine_config: Optional[EngineConfig] = None) -> ChatBackend:
    """`api_url`: an OpenAI-compatible server; otherwise the in-process engine on MODEL (default puyu-tiny)."""
    if api_url:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"--api-url: expected an http(s) URL, got {api_url!r}")
        return OpenAIBackend(api_url, api_key=api_key, model=model_name)
    from ..resolve import resolve_model_path

    return EngineBackend(resolve_model_path(model), engine_config or EngineConfig())


def make_analysis_service(backend: ChatBackend) -> Optional[object]:
    """The data-analysis agent on the same model as the chat, or None when the agent extra is missing."""
    try:
        from .analysis import AnalysisService
    except ImportError:
        return None
    return AnalysisService.for_backend(backend)
