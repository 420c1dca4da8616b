"""Errors the engine raises for bad input (all are ValueErrors, so the CLI and the server treat them as user errors)."""
from __future__ import annotations

from ..config import ConfigError
from ..convert.spec import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "PromptTooLongError"]


class PromptTooLongError(ValueError):
    """The prompt does not fit in the session; the message gives both lengths."""

    def __init__(self, prompt_len: int, session_len: int):
        self.prompt_len, self.session_len = prompt_len, session_len
        super().__init__(f"prompt: {prompt_len} tokens is longer than session_len {session_len}")
