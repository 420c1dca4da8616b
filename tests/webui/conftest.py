"""Fixtures for the web UI tests: headless Debian chromium through Playwright, and `puyu serve` as a subprocess."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from puyu.testing import free_port
from webui_testlib import CHROMIUM, CHROMIUM_ARGS, expect_timeout_ms, puyu_process


@pytest.fixture(scope="session", autouse=True)
def _expect_timeout() -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=expect_timeout_ms)


@pytest.fixture(scope="module")
def browser():
    """One headless chromium per test module (a session-wide one would keep Playwright's event loop running in the
    main thread, so every later asyncio.run() in the same pytest run fails); each test opens its own contexts."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"{CHROMIUM} not found: scripts/setup.sh --test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def puyu_server(internlm2_checkpoint, tmp_path_factory):
    """`puyu serve` on the tiny InternLM2 checkpoint, as a real subprocess: yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with puyu_process(["serve", str(internlm2_checkpoint), "--backend", "native", "--server-port", str(port),
                       "--session-len", "2048", "--cache-max-entry-count", "64", "--num-threads", "1"], port, log,
                      "/health") as proc:
        proc.wait_ready(180)
        yield proc.base_url


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
