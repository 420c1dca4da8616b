"""The composition tab (图文创作) in headless chromium, on the real in-process engine with a scripted tiny
XComposer2 checkpoint (greedy decoding writes a fixed article with one picture slot): upload pictures, compose, the
rendered article shows the chosen picture; a text-only model gets an explanation instead of the tab."""
from __future__ import annotations

import base64

import pytest
from playwright.sync_api import expect

from webui_testlib import running_app
from puyu.config import EngineConfig
from puyu.engine import AsyncEngine
from puyu.testing import random_png, scripted_copy
from puyu.webui.app import AppConfig
from puyu.webui.backends import EngineBackend
from puyu.personas import PLAIN
from puyu.webui.settings import ChatSettings

REPLY = "Sun<image: red square>End<|im_end|>"
SETTINGS = ChatSettings(max_new_tokens=40, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def scripted_backend(xcomposer2_checkpoint, tmp_path_factory):
    model = scripted_copy(xcomposer2_checkpoint, tmp_path_factory.mktemp("scripted-xc2-ui") / "model", REPLY)
    backend = EngineBackend(AsyncEngine(model, EngineConfig(dtype="float32", session_len=1024,
                                                            cache_max_entry_count=64)))
    yield backend
    backend.close()


def test_compose_tab_renders_the_article_with_the_chosen_picture(scripted_backend, page_factory, tmp_path):
    a, b = random_png(tmp_path / "a.png", 1), random_png(tmp_path / "b.png", 2)
    with running_app(scripted_backend, AppConfig(personas=[PLAIN], chat_defaults=SETTINGS)) as url:
        page = page_factory(url)
        page.get_by_role("tab", name="Composition").click()
        page.locator("#compose-go").click()
        expect(page.locator("#compose-error")).to_contain_text("write an instruction first")
        page.locator("#compose-instruction textarea").fill("Write about the sun")
        page.locator("#compose-pictures input[type='file']").set_input_files([str(a), str(b)])
        for name in ("a.png", "b.png"):
            expect(page.locator(f"#compose-pictures a[href$='/{name}']")).to_have_count(1)
        page.locator("#compose-go").click()
        picture = page.locator("#compose-article img")
        expect(picture).to_have_count(1)
        expect(page.locator("#compose-article")).to_contain_text("SunEnd")
        src = picture.get_attribute("src")
        assert src == "data:image/png;base64," + base64.b64encode(a.read_bytes()).decode()
        assert picture.get_attribute("alt") == "red square"
        for name in ("article.md", "article.html"):
            expect(page.locator(f"#compose-files a[href$='/{name}']")).to_have_count(1)
        expect(page.locator("#compose-error")).to_have_text("")


def test_compose_tab_explains_a_text_only_model(internlm2_checkpoint, page_factory):
    backend = EngineBackend(AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=16)))
    try:
        with running_app(backend, AppConfig(personas=[PLAIN], chat_defaults=SETTINGS)) as url:
            page = page_factory(url)
            page.get_by_role("tab", name="Composition").click()
            expect(page.locator("#compose-unavailable")).to_contain_text("InternLM-XComposer2")
    finally:
        backend.close()
