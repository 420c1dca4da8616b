"""A recorded model: replays fixed InternLM2-format replies, streamed in small chunks like a real backend.

For regression runs of the agent machinery (interpreter, protocol, run folder, scoring) where a real model's content
would be noise (the tiny test models) or non-deterministic. A replay file is JSON: a list of replies (used for every
run) or an object mapping task ids to lists of replies (for `puyu agent batch`).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

from .llm_base import StreamingModel


class ReplayExhausted(RuntimeError):
    pass


class ReplayModel(StreamingModel):
    """Each call returns the next recorded reply; the prompts it was given are kept in `prompts`."""

    def __init__(self, replies: list[str], chunk_chars: int = 5, name: str = "replay", **kwargs) -> None:
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            raise ValueError("replies: must be a list of strings")
        super().__init__(name, **kwargs)
        self.replies = list(replies)
        self.chunk_chars = chunk_chars
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def _stream(self, prompt: str, params: dict) -> Iterator[str]:
        with self._lock:
            self.prompts.append(prompt)
            index = len(self.prompts) - 1
        if index >= len(self.replies):
            raise ReplayExhausted(f"the recording has only {len(self.replies)} replies")
        reply = self.replies[index]
        self.last_usage = {"prompt_chars": len(prompt), "completion_chars": len(reply)}
        for i in range(0, len(reply), self.chunk_chars):
            yield reply[i:i + self.chunk_chars]


def load_replay(path: Union[str, Path], task_id: Optional[str] = None) -> list[str]:
    """The replies for one run (`task_id` selects from an object keyed by task id)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: replay file does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        if task_id is None or task_id not in data:
            raise ValueError(f"{path}: no recorded replies for task {task_id!r}")
        data = data[task_id]
    if not isinstance(data, list) or not all(isinstance(r, str) for r in data):
        raise ValueError(f"{path}: must hold a list of reply strings (or an object of such lists by task id)")
    return data
