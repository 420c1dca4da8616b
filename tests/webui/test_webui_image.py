"""The image Q&A tab in headless chromium, on the real in-process engine with the tiny XComposer2 checkpoint:
upload a picture, ask, the streamed answer is what the engine gives for the same request, multi-turn keeps the
picture on the first question, a new picture starts over, asking without one is an error in the page."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from test_webui_chat import reference_reply
from webui_testlib import Recording, letters, running_app
from puyu.config import EngineConfig
from puyu.testing import random_png
from puyu.engine import AsyncEngine
from puyu.webui.app import AppConfig
from puyu.webui.backends import EngineBackend
from puyu.webui.image_tab import READY
from puyu.personas import PLAIN
from puyu.webui.settings import ChatSettings

GREEDY = ChatSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def vl_backend(xcomposer2_checkpoint):
    backend = EngineBackend(AsyncEngine(xcomposer2_checkpoint, EngineConfig(dtype="float32", session_len=1024,
                                                                            cache_max_entry_count=64)))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def app(vl_backend):
    rec = Recording(vl_backend)
    with running_app(rec, AppConfig(personas=[PLAIN], chat_defaults=GREEDY)) as url:
        yield url, rec


def _ask(page, text: str) -> None:
    page.locator("#vqa-input textarea").fill(text)
    page.locator("#vqa-input textarea").press("Enter")


def _answers(page):
    return page.locator("#vqa-history [data-testid='bot']")


def test_image_question_answered_over_two_turns(app, page_factory, vl_backend, tmp_path):
    url, rec = app
    rec.requests.clear()
    rec.hold = False
    page = page_factory(url)
    page.get_by_role("tab", name="Image Q&A").click()
    _ask(page, "What is this?")
    expect(page.locator("#vqa-error")).to_contain_text("upload an image first")
    assert rec.requests == []
    page.locator("#vqa-image input[type='file']").set_input_files(str(random_png(tmp_path / "a.png", 1)))
    expect(page.locator("#vqa-status")).to_have_text(READY)  # the server has the new conversation
    rec.hold = True  # the stream pauses after its first text until the page has shown it
    _ask(page, "What is this?")
    assert rec.holding.wait(60), "the backend never streamed"
    expect(page.locator("#vqa-status")).to_contain_text("generating")
    expect(_answers(page)).to_have_count(1)
    expect(_answers(page).first).not_to_have_text(re.compile(r"^\s*$"))  # the first streamed text is on the page
    partial = _answers(page).first.inner_text().strip()
    rec.hold = False
    rec.release()
    expect(page.locator("#vqa-status")).to_contain_text("finish: length")
    messages, settings = rec.requests[0]
    assert messages[0]["content"][0]["type"] == "image_url"
    assert messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert messages[0]["content"][1] == {"type": "text", "text": "What is this?"}
    expected = reference_reply(vl_backend, messages, settings)
    final = _answers(page).first.inner_text().strip()
    assert letters(final) == letters(expected) and letters(expected)
    assert partial and final != partial  # the reply grew after the first chunk was shown
    # the picture matters: without it the same question gets another answer
    text_only = reference_reply(vl_backend, [{"role": "user", "content": "What is this?"}], settings)
    assert text_only != expected
    _ask(page, "And the colours?")
    expect(_answers(page)).to_have_count(2)
    expect(page.locator("#vqa-status")).to_contain_text("finish: length")
    second, _ = rec.requests[1]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert isinstance(second[0]["content"], list) and second[2]["content"] == "And the colours?"
    assert letters(_answers(page).nth(1).inner_text()) == letters(reference_reply(vl_backend, second, settings))
    # another picture starts a new conversation
    page.locator("#vqa-image input[type='file']").set_input_files(str(random_png(tmp_path / "b.png", 2)))
    expect(_answers(page)).to_have_count(0)
    expect(page.locator("#vqa-status")).to_have_text(READY)
    _ask(page, "What is this?")
    expect(_answers(page)).to_have_count(1)
    expect(page.locator("#vqa-status")).to_contain_text("finish: length")
    third, _ = rec.requests[2]
    first_url = messages[0]["content"][0]["image_url"]["url"]
    assert len(third) == 1 and third[0]["content"][0]["image_url"]["url"] != first_url
