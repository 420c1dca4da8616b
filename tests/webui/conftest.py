"""Fixtures for the web UI tests: headless Debian chromium through Playwright, and the app on a free port."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = os.environ.get("PUYU_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs"

expect_timeout_ms = 60_000  # a generous ceiling for slow CI; no test depends on how fast anything is


@pytest.fixture(scope="session", autouse=True)
def _expect_timeout() -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=expect_timeout_ms)


class Recording:
    """Wraps a real chat backend: records every request it gets, and can hold a stream after its first text chunk
    until the test calls `release()` (so the test can see a partial reply in the page without racing the engine)."""

    def __init__(self, inner):
        self.inner = inner
        self.description = inner.description
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser():
    """One headless chromium for the whole run; each test opens its own contexts (separate cookies and sessions)."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"{CHROMIUM} not found: scripts/setup.sh --test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              args=CHROMIUM_ARGS)
        yield b
        b.close()


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


@pytest.fixture
def page_factory(browser):
    """`new_page(url)`: a page in a fresh browser context (a separate Gradio session), closed after the test."""
    contexts = []

    def new_page(url: str):
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(60_000)
        contexts.append(ctx)
        page = ctx.new_page()
        page.goto(url)
        page.locator("#tab-chat, #tab-analysis").first.wait_for(state="attached")
        return page

    yield new_page
    for ctx in contexts:
        ctx.close()
