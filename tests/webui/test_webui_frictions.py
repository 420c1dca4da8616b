"""The chat tab's first-hour frictions, in headless chromium on the real engine: the user's message shows at once,
Stop leaves a status, a persona switch asks before wiping, the default persona suits the model, a persona the model
cannot speak is offered with a note."""
from __future__ import annotations

import warnings

import pytest
from playwright.sync_api import expect

from webui_testlib import Recording, running_app, send
from puyu.config import EngineConfig
from puyu.engine import AsyncEngine
from puyu.webui.app import AppConfig, quiet_gradio_warnings
from puyu.webui.backends import EngineBackend
from puyu.personas import PLAIN, Persona, claims_internlm, load_personas, order_for_model
from puyu.webui.settings import ChatSettings

PERSONAS = load_personas()  # the real ones: default (InternLM), assistant, 八戒, pirate, plain
BAJIE = next(p for p in PERSONAS if p.name == "八戒")
SHORT = ChatSettings(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine_backend(internlm2_checkpoint):
    # the tiny fixture's folder name does not say InternLM; its tokenizer is byte-level for Chinese (as SmolLM2's)
    backend = EngineBackend(AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=512, cache_max_entry_count=32)))
    backend.model_id = "tiny-llama"  # what a non-InternLM model reports
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def app(engine_backend):
    rec = Recording(engine_backend)
    with running_app(rec, AppConfig(personas=PERSONAS, chat_defaults=SHORT)) as url:
        yield url, rec


@pytest.fixture
def chat(app, page_factory):
    url, rec = app
    rec.requests.clear()
    rec.hold = rec.hold_start = False
    return page_factory(url), rec


def users(page):
    return page.locator("#chat-history [data-testid='user']")


def pick(page, name: str) -> None:
    page.locator("#chat-persona input").click()
    page.get_by_role("option", name=name).click()


def test_the_message_shows_before_the_first_token_and_stop_says_so(chat):
    page, rec = chat
    rec.hold_start = True
    send(page, "Hello there")
    assert rec.starting.wait(60), "the backend was never called"
    expect(users(page)).to_have_count(1)  # while the backend has not produced a token yet
    expect(users(page).first).to_contain_text("Hello there")
    expect(page.locator("#chat-status")).to_contain_text("generating")
    page.locator("#chat-stop").click()
    rec.release()
    expect(page.locator("#chat-status")).to_contain_text("stopped")
    expect(page.locator("#chat-status")).not_to_contain_text("generating")


def test_a_persona_switch_asks_before_wiping_the_conversation(chat):
    page, rec = chat
    send(page, "Remember me")
    expect(page.locator("#chat-status")).to_contain_text("finish:")
    start = page.locator("#chat-persona input").input_value()
    page.once("dialog", lambda d: d.dismiss())
    pick(page, "Captain Puyu")
    expect(page.locator("#chat-persona input")).to_have_value(start)  # refused: back to the old persona
    expect(users(page)).to_have_count(1)
    page.once("dialog", lambda d: d.accept())
    pick(page, "Captain Puyu")
    expect(users(page)).to_have_count(0)
    expect(page.locator("#chat-system textarea")).to_have_value(
        next(p for p in PERSONAS if p.name == "Captain Puyu").system)


def test_the_default_persona_is_neutral_and_a_foreign_language_one_has_a_note(chat):
    page, rec = chat
    start = page.locator("#chat-persona input").input_value()
    assert start == "Assistant"  # not 'You are InternLM' on a model that is not InternLM
    expect(page.locator("#chat-persona-note")).not_to_contain_text("Chinese")
    pick(page, "八戒")  # offered (marked), not hidden
    expect(page.locator("#chat-persona-note")).to_contain_text("speaks Chinese")
    expect(page.locator("#chat-system textarea")).to_have_value(BAJIE.system)


def test_persona_order_follows_the_model():
    internlm = order_for_model(PERSONAS, "internlm2-chat-1_8b InternLM2ForCausalLM")
    assert internlm[0] == PERSONAS[0] and claims_internlm(PERSONAS[0])
    other = order_for_model(PERSONAS, "SmolLM2-135M-Instruct llama")
    assert not claims_internlm(other[0]) and sorted(p.name for p in other) == sorted(p.name for p in PERSONAS)
    only = [Persona("InternLM", "You are InternLM.")]
    assert order_for_model(only, "llama") == only and order_for_model([PLAIN], "x") == [PLAIN]


def test_gradio_pandas_warnings_are_silenced():
    from gradio.queueing import Queue

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_gradio_warnings()
        Queue._get_df([{"a": 1}])
    assert not [w for w in seen if type(w.message).__name__ == "Pandas4Warning"], [str(w.message) for w in seen]


def test_a_servers_model_is_probed_for_the_persona_choice(puyu_server):
    import httpx

    from puyu.testing import free_port
    from puyu.webui.services import make_chat_backend

    served = httpx.get(f"{puyu_server}/v1/models").json()["data"][0]["id"]
    assert make_chat_backend(None, puyu_server).model_id == served
    assert make_chat_backend(None, f"http://127.0.0.1:{free_port()}").model_id == ""  # nobody there: neutral
