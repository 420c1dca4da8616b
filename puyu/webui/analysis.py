"""Data-analysis runs for the web UI: one `puyu.agent` run per question, in a folder of the browser session's own.

The agent runs in a worker thread (Lagent is synchronous) and writes its transcript as JSONL; the page follows that
file, so every step (thought, code cell, output, error, figure, answer) shows as soon as the runner records it, and
the model turn being generated is shown as it streams.
Every run gets a fresh sandboxed interpreter, and each browser session its own folder, so two sessions never share
files or interpreter state.
"""
from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from ..agent.runner import RunConfig, run_analysis
from .backends import ChatBackend, EngineBackend, OpenAIBackend

ModelFactory = Callable[[], Any]  # a Lagent BaseModel per run (may return one shared, thread-safe model)


def default_runs_root() -> Path:
    return Path(tempfile.gettempdir()) / "puyu-webui-runs"


@dataclass
class AnalysisSession:
    """One browser session's runs. Created on the session's first run (a gr.State default would be shared)."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    runs: int = 0
    current: Optional["LiveTap"] = None  # the model of the run in progress (the stop button reaches it here)

    def stop(self) -> bool:
        """Ask the run in progress to end; True if there was one."""
        if self.current is None:
            return False
        self.current.stopped = True
        return True


@dataclass
class AnalysisService:
    make_model: ModelFactory
    runs_root: Path = field(default_factory=default_runs_root)
    run_config: RunConfig = field(default_factory=RunConfig)
    gen_params: dict = field(default_factory=dict)
    description: str = "agent"

    def __post_init__(self) -> None:
        self.runs_root = Path(self.runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_backend(cls, backend: ChatBackend, runs_root: Optional[Path] = None) -> "AnalysisService":
        """The agent on the chat's model: the same in-process engine, or the same server."""
        if isinstance(backend, EngineBackend):
            from ..agent.models import EngineModel

            factory = _shared(lambda: EngineModel(engine=backend.engine))
        elif isinstance(backend, OpenAIBackend):
            from ..agent.models import OpenAIServerModel

            factory = _shared(lambda: OpenAIServerModel(backend.base_url, model_name=backend.model,
                                                        api_key=backend.api_key))
        else:
            raise ValueError(f"no agent model for a {type(backend).__name__}")
        return cls(factory, runs_root or default_runs_root(), description=backend.description)

    def new_run_dir(self, session: AnalysisSession) -> Path:
        session.runs += 1
        return self.runs_root / session.id / f"run-{session.runs:03d}"


def _shared(build: Callable[[], Any]) -> ModelFactory:
    """One model built on first use (building a server model calls the server, so not at startup)."""
    lock = threading.Lock()
    box: list[Any] = []

    def get() -> Any:
        with lock:
            if not box:
                box.append(build())
            return box[0]

    return get


class StoppedByUser(RuntimeError):
    pass


class LiveTap:
    """Wraps the run's Lagent model and keeps the text of the turn being generated, so the page can show a model
    turn while it streams (the transcript only gets it once the turn is complete). Everything else is delegated.

    `stopped = True` ends the run at the model's next chunk: the stream fails, which the agent records as a model
    error and ends the run cleanly (the request in the backend is closed with it)."""

    def __init__(self, model: Any):
        self._model = model
        self.text = ""
        self.stopped = False

    def wrap(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def stream_chat(self, *args: Any, **kwargs: Any) -> Iterator[tuple]:
        if self.stopped:
            raise StoppedByUser("stopped by the user")
        inner = self._model.stream_chat(*args, **kwargs)
        try:
            for status, text, extra in inner:
                if self.stopped:
                    raise StoppedByUser("stopped by the user")
                self.text = text
                yield status, text, extra
        finally:
            self.text = ""
            getattr(inner, "close", lambda: None)()  # ends the model's request now, not at garbage collection


def zip_run(run_dir: Path) -> Path:
    """`run-NNN.zip` next to the folder, holding `run-NNN/` (transcript, report, figures, work files).

    The sandboxed code could write anything inside the run folder, so only regular files are packed, each opened
    with O_NOFOLLOW after an lstat: a symlink (to /root, to /proc/self/environ) or a fifo is left out, never read
    through, and folders are walked without following links."""
    target = run_dir.with_name(run_dir.name + ".zip")
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder, dirs, files in os.walk(run_dir, followlinks=False):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            for name in sorted(files):
                path = os.path.join(folder, name)
                data = _read_regular_file(path)
                if data is not None:
                    archive.writestr(os.path.join(run_dir.name, os.path.relpath(path, run_dir)), data)
    os.replace(tmp, target)
    return target


def _read_regular_file(path: str) -> Optional[bytes]:
    """The bytes of `path` if it is a regular file and not a link (checked on the opened descriptor), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read()


def _read_new_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSONL lines after byte `offset` (a line still being written waits for the next poll)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


async def follow_run(service: AnalysisService, session: AnalysisSession, run_dir: Path, question: str,
                     files: list[str], poll_s: float = 0.1) -> AsyncIterator[dict]:
    """Start a run in `run_dir` (a new folder of the session's) and yield its transcript events as they are
    written, with `{"event": "partial", "text": ...}` for the turn being generated. A failure before or outside
    the agent loop (a bad file, a model that cannot be built) arrives as a final `{"event": "ui_error"}`."""
    outcome: dict[str, Any] = {}
    tap = session.current = LiveTap(None)  # set before the thread starts: a second run waits for this one

    def work() -> None:
        try:
            tap.wrap(service.make_model())
            outcome["result"] = run_analysis(tap, question, files, run_dir, service.run_config,
                                             **service.gen_params)
        except Exception as exc:  # shown in the page
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            session.current = None

    thread = threading.Thread(target=work, name=f"puyu-webui-{run_dir.name}", daemon=True)
    thread.start()
    transcript, offset, shown = run_dir / "transcript.jsonl", 0, ""
    while True:
        alive = thread.is_alive()
        events, offset = _read_new_lines(transcript, offset)
        for event in events:
            yield event
        live = tap.text if alive else ""
        if live != shown:  # the turn in progress ("" once it is complete and recorded)
            shown = live
            yield {"event": "partial", "text": live}
        if not alive:
            break
        if not events:
            await asyncio.sleep(poll_s)
    if "error" in outcome:
        yield {"event": "ui_error", "message": outcome["error"]}
