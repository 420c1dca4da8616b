"""Helpers for the web UI tests (imported by name; the fixtures are in conftest.py): the app on a free port, a
recording backend wrapper, `puyu` subprocesses (puyu.testing.ServerProcess), and page actions."""
from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import re
import sys
import threading
from pathlib import Path
from typing import Iterator

from puyu.testing import ServerProcess, free_port

CHROMIUM = os.environ.get("PUYU_CHROMIUM", "/usr/bin/chromium")


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


# the README's screenshots are refreshed only on request (PUYU_UPDATE_DOCS=1): a test run leaves the checkout clean
DOCS = (Path(__file__).resolve().parents[2] / "docs" if os.environ.get("PUYU_UPDATE_DOCS") == "1"
        else Path(tempfile.gettempdir()) / "puyu-webui-screenshots")


expect_timeout_ms = 60_000  # a generous ceiling for slow CI; no test depends on how fast anything is


class Recording:
    """Wraps a real chat backend: records every request it gets, and can hold a stream after its first text chunk
    until the test calls `release()` (so the test can see a partial reply in the page without racing the engine)."""

    def __init__(self, inner):
        self.inner = inner
        self.description = inner.description
        self.model_id = getattr(inner, "model_id", "")
        self.tokenizer = getattr(inner, "tokenizer", None)
        self.hold_start = False  # hold before the first chunk, until release()
        self.starting = threading.Event()
        self.requests: list[tuple[list[dict], object]] = []
        self.replies: list[str] = []
        self.hold = False
        self._released = threading.Event()
        self.holding = threading.Event()

    def release(self) -> None:
        self._released.set()

    async def stream(self, messages, settings):
        self.requests.append(([dict(m) for m in messages], settings))
        self._released.clear()
        held, text = False, ""
        if self.hold_start:
            self.starting.set()
            await asyncio.to_thread(self._released.wait, expect_timeout_ms / 1000)
            self.starting.clear()
            self._released.clear()
        async for chunk in self.inner.stream(messages, settings):
            text += chunk.text
            yield chunk
            if self.hold and not held and chunk.text:
                held = True
                self.holding.set()
                await asyncio.to_thread(self._released.wait, expect_timeout_ms / 1000)
                self.holding.clear()
        self.replies.append(text)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def running_app(backend, config=None) -> Iterator[str]:
    """Build the real app around `backend`, serve it on 127.0.0.1 at a free port, yield its URL."""
    from puyu.webui.app import build_app, launch

    app = build_app(backend, config)
    url = launch(app, "127.0.0.1", free_port(), config)
    try:
        yield url
    finally:
        app.close()


def puyu_process(args: list[str], port: int, log: Path, ready_path: str) -> ServerProcess:
    """A real `puyu ...` subprocess serving on `port`, its output kept in `log` (shown when it fails to come up);
    `wait_ready()` waits until `ready_path` answers 200."""
    return ServerProcess([sys.executable, "-m", "puyu.cli", *args], port, log, ready_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})


def letters(text: str) -> str:
    """Letters and digits only: what survives Markdown rendering of a random model's reply unchanged."""
    return re.sub(r"[\W_]", "", text)


def send(page, text: str) -> None:
    """Type a message into the chat tab and press Enter."""
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def upload(page, *paths: Path) -> None:
    """Put files into the data-analysis tab's upload box and wait until the page lists every one of them."""
    page.get_by_role("tab", name="Data analysis").click()
    page.locator("#analysis-files input[type='file']").set_input_files([str(p) for p in paths])
    for path in paths:
        expect_count(page.locator(f"#analysis-files a[href$='/{path.name}']"), 1)


def expect_count(locator, n: int) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_count(n)
