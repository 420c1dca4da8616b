"""The Gradio app: chat, image Q&A, composition (图文创作) and data-analysis tabs, each with its own per-session
state."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a server that may be offline

import gradio as gr  # noqa: E402

from .backends import ChatBackend  # noqa: E402
from .chat_tab import build_chat_tab  # noqa: E402
from .compose_tab import build_compose_tab  # noqa: E402
from .image_tab import build_image_tab  # noqa: E402
from ..personas import Persona, load_personas  # noqa: E402
from .settings import ChatSettings  # noqa: E402

if TYPE_CHECKING:  # the agent extra may be missing: the app then runs without the analysis tab
    from .analysis import AnalysisService

TITLE = "puyu · 浦语"


@dataclass
class AppConfig:
    personas: list[Persona] = field(default_factory=load_personas)
    chat_defaults: ChatSettings = field(default_factory=ChatSettings)
    analysis: Optional[AnalysisService] = None  # (analysis.py); None: the tab explains why not

    def __post_init__(self) -> None:
        if not self.personas:
            raise ValueError("personas: at least one persona is needed")


def build_app(backend: ChatBackend, config: Optional[AppConfig] = None) -> gr.Blocks:
    config = config or AppConfig()
    # Gradio makes and drops event loops while it builds an app. When a library has turned ResourceWarnings on,
    # the "unclosed event loop" warning is formatted inside the garbage collector, and that import can break an
    # import running at the same time on CPython 3.11 (KeyError in importlib's module locks): keep it quiet.
    warnings.filterwarnings("ignore", message="unclosed event loop", category=ResourceWarning)
    quiet_gradio_warnings()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                build_chat_tab(backend, config.personas, config.chat_defaults)
            with gr.Tab("Image Q&A", id="image", elem_id="tab-image"):
                build_image_tab(backend, config.chat_defaults)
            with gr.Tab("Composition", id="compose", elem_id="tab-compose"):
                build_compose_tab(_vision_pipeline(backend), config.chat_defaults.max_new_tokens)
            with gr.Tab("Data analysis", id="analysis", elem_id="tab-analysis"):
                _analysis_tab(config.analysis)
    app.queue(default_concurrency_limit=16)
    return app


def quiet_gradio_warnings() -> None:
    """Gradio's queue builds a pandas frame with options pandas 3 deprecates, for every event: a Pandas4Warning per
    click floods the log. They are Gradio's to fix, not the user's: silenced for Gradio's modules only."""
    try:
        from pandas.errors import Pandas4Warning
    except ImportError:  # pandas < 3 warns nothing of the kind
        return
    warnings.filterwarnings("ignore", category=Pandas4Warning, module=r"gradio(\.|$)")


def _vision_pipeline(backend: ChatBackend) -> Optional[object]:
    """A pipeline on the backend's engine when it is in-process and has vision (composition runs several requests
    and image captions itself), else None."""
    engine = getattr(backend, "engine", None)
    if engine is None or not getattr(getattr(engine, "spec", None), "vision", ""):
        return None
    from ..engine.pipeline import Pipeline

    return Pipeline(engine)


def _analysis_tab(service: Optional["AnalysisService"]) -> None:
    if service is None:
        gr.Markdown("The data-analysis agent is not available here: install the agent extra "
                    "(`pip install 'puyu[agent]'`).", elem_id="analysis-unavailable")
        return
    from .analysis_tab import build_analysis_tab

    build_analysis_tab(service)


def launch(app: gr.Blocks, server_name: str = "127.0.0.1", server_port: int = 6006,
           config: Optional[AppConfig] = None) -> str:
    """Start the server in a background thread and return its URL (`app.block_thread()` waits, `app.close()` stops).
    The agent's run folders are the only files outside Gradio's cache that the page may fetch (figures, zips)."""
    runs_root = getattr(config.analysis, "runs_root", None) if config else None
    _, url, _ = app.launch(server_name=server_name, server_port=server_port, prevent_thread_lock=True,
                           quiet=True, share=False, footer_links=[], show_error=True,
                           allowed_paths=[str(runs_root)] if runs_root else None)
    return url
