"""The chat tab in headless chromium, on the real in-process engine (a tiny InternLM2 checkpoint)."""
from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from playwright.sync_api import expect

from webui_testlib import DOCS, Recording, letters, running_app, send, upload
from puyu.config import EngineConfig
from puyu.engine import AsyncEngine
from puyu.agent.runner import RunConfig
from puyu.webui.analysis import AnalysisService
from puyu.webui.app import AppConfig
from puyu.webui.backends import EngineBackend
from puyu.personas import PLAIN, load_personas
from puyu.webui.settings import ChatSettings

BAJIE = next(p for p in load_personas() if p.name == "八戒")  # the real one, from configs/personas
GREEDY = ChatSettings(max_new_tokens=24, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine_backend(internlm2_checkpoint):
    backend = EngineBackend(AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=1024, cache_max_entry_count=64)))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def app(engine_backend, tmp_path_factory):
    rec = Recording(engine_backend)
    # the data-analysis agent on the same engine (a random model's turns are noise, but they are real turns)
    agent = AnalysisService.for_backend(engine_backend, tmp_path_factory.mktemp("runs"))
    agent.run_config, agent.gen_params = RunConfig(max_turn=2), {"max_new_tokens": 16}
    with running_app(rec, AppConfig(personas=[PLAIN, BAJIE], chat_defaults=GREEDY, analysis=agent)) as url:
        yield url, rec


@pytest.fixture
def chat(app, page_factory):
    url, rec = app
    rec.requests.clear()
    rec.replies.clear()
    rec.hold = False
    return page_factory(url), rec


def bot_messages(page):
    return page.locator("#chat-history [data-testid='bot']")


def reference_reply(backend: EngineBackend, messages: list[dict], settings: ChatSettings) -> str:
    async def collect() -> str:
        return "".join([c.text async for c in backend.stream(messages, settings)])

    # sync Playwright owns this thread's event loop: run the coroutine on a thread of its own
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, collect()).result()


def test_streamed_reply_appears_and_matches_the_engine(chat, engine_backend):
    page, rec = chat
    rec.hold = True  # the stream pauses after its first text until we have seen it in the page
    send(page, "Hello, how are you today?")
    assert rec.holding.wait(60), "the backend never streamed"
    expect(page.locator("#chat-status")).to_contain_text("generating")
    expect(bot_messages(page)).to_have_count(1)
    partial = bot_messages(page).first.inner_text()
    assert letters(partial), "the first streamed chunk is not on the page"
    rec.release()
    expect(page.locator("#chat-status")).to_contain_text("finish: length")
    expect(page.locator("#chat-status")).to_contain_text("generated tokens: 24")
    final = bot_messages(page).first.inner_text()
    assert letters(final).startswith(letters(partial)) and len(letters(final)) > len(letters(partial))
    # what the page shows is what the engine generates for the same request
    messages, settings = rec.requests[0]
    assert messages == [{"role": "user", "content": "Hello, how are you today?"}]
    assert settings == GREEDY
    assert letters(final) == letters(reference_reply(engine_backend, messages, settings))


def test_multi_turn_history_goes_into_the_next_request(chat):
    page, rec = chat
    send(page, "What is the capital of France?")
    expect(page.locator("#chat-status")).to_contain_text("finish:")
    send(page, "And of China?")
    expect(bot_messages(page)).to_have_count(2)
    expect(page.locator("#chat-status")).to_contain_text("finish:")
    second = rec.requests[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"] == "What is the capital of France?"
    assert second[1]["content"] == rec.replies[0]
    assert second[2]["content"] == "And of China?"


def test_persona_sets_greeting_and_system_prompt_of_the_request(chat):
    page, rec = chat
    page.locator("#chat-persona input").click()
    page.get_by_role("option", name="八戒").click()
    expect(bot_messages(page)).to_have_count(1)
    expect(bot_messages(page).first).to_contain_text(BAJIE.greeting[:8])
    expect(page.locator("#chat-system textarea")).to_have_value(BAJIE.system)
    send(page, "猴哥，师父被妖怪抓走了！")
    expect(page.locator("#chat-status")).to_contain_text("finish:")
    messages = rec.requests[-1][0]
    assert messages[0] == {"role": "system", "content": BAJIE.system}
    assert messages[1] == {"role": "assistant", "content": BAJIE.greeting}
    assert messages[2] == {"role": "user", "content": "猴哥，师父被妖怪抓走了！"}
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "webui-chat.png"), full_page=True)
    # an edited system prompt is what the next request carries
    page.locator("#chat-system textarea").fill("You are a terse assistant.")
    send(page, "Hi")
    expect(bot_messages(page)).to_have_count(3)
    expect(page.locator("#chat-status")).to_contain_text("finish:")
    assert rec.requests[-1][0][0] == {"role": "system", "content": "You are a terse assistant."}


def test_generation_settings_reach_the_engine(chat):
    page, rec = chat
    for elem, value in (("chat-max-tokens", "5"), ("chat-temperature", "0.7"), ("chat-top-p", "0.9"),
                        ("chat-top-k", "7"), ("chat-repetition-penalty", "1.1")):
        box = page.locator(f"#{elem} input[type='number']")
        box.fill(value)
        box.press("Enter")
    send(page, "Tell me about the weather in Shanghai.")
    expect(page.locator("#chat-status")).to_contain_text("generated tokens: 5")
    assert rec.requests[-1][1] == ChatSettings(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=7,
                                               repetition_penalty=1.1)


def test_stop_regenerate_and_clear(chat, engine_backend):
    page, rec = chat
    rec.hold = True
    send(page, "Please write a Python function that adds two numbers.")
    assert rec.holding.wait(60)
    expect(bot_messages(page)).to_have_count(1)
    page.locator("#chat-stop").click()
    rec.release()
    # the partial reply stays, the request is aborted and its KV blocks are freed
    expect(page.locator("#chat-status")).not_to_contain_text("finish:")
    stats = engine_backend.engine.stats
    for _ in range(600):  # poll (60 s ceiling): the abort reaches the engine thread asynchronously
        if stats()["running"] == 0 and stats()["blocks_used"] == 0:
            break
        page.wait_for_timeout(100)
    assert stats()["running"] == 0 and stats()["blocks_used"] == 0
    assert rec.replies == []  # the stopped stream never finished
    rec.hold = False
    page.locator("#chat-regenerate").click()
    expect(page.locator("#chat-status")).to_contain_text("finish: length")
    expect(bot_messages(page)).to_have_count(1)
    assert rec.requests[-1][0] == rec.requests[0][0]  # the same question, asked again
    assert letters(bot_messages(page).first.inner_text()) == letters(rec.replies[-1])
    page.locator("#chat-clear").click()
    expect(bot_messages(page)).to_have_count(0)
    expect(page.locator("#chat-history [data-testid='user']")).to_have_count(0)


def test_backend_error_is_shown_in_the_page(chat):
    page, rec = chat
    send(page, "hello " * 500)  # far longer than session_len 1024
    expect(page.locator("#chat-error")).to_contain_text("longer than session_len 1024")
    expect(bot_messages(page)).to_have_count(0)
    # the failed message is handed back for editing, not kept in the history
    expect(page.locator("#chat-history [data-testid='user']")).to_have_count(0)
    expect(page.locator("#chat-input textarea")).to_have_value(("hello " * 500).strip())
    # the page keeps working after the error, and the error goes away
    send(page, "Hello")
    expect(page.locator("#chat-status")).to_contain_text("finish:")
    expect(page.locator("#chat-error")).not_to_contain_text("Error")


def test_two_sessions_keep_separate_histories(chat, page_factory, app):
    page_a, rec = chat
    page_b = page_factory(app[0])
    send(page_a, "The quick brown fox")
    expect(page_a.locator("#chat-status")).to_contain_text("finish:")
    send(page_b, "上海是中国的一个大城市")
    expect(page_b.locator("#chat-status")).to_contain_text("finish:")
    send(page_a, "jumps over the lazy dog")
    expect(page_a.locator("#chat-history [data-testid='user']")).to_have_count(2)
    expect(page_a.locator("#chat-status")).to_contain_text("finish:")
    expect(page_b.locator("#chat-history [data-testid='user']")).to_have_count(1)
    expect(page_a.locator("#chat-history")).not_to_contain_text("上海")
    expect(page_b.locator("#chat-history")).not_to_contain_text("fox")
    third = rec.requests[2][0]
    assert [m["content"] for m in third if m["role"] == "user"] == ["The quick brown fox", "jumps over the lazy dog"]


def test_agent_runs_on_the_same_engine(chat, engine_backend, tmp_path):
    page, rec = chat
    csv = tmp_path / "numbers.csv"
    csv.write_text("x,y\n1,2\n3,4\n")
    upload(page, csv)
    generated = engine_backend.engine.stats()["tokens_generated"]
    page.locator("#analysis-question textarea").fill("What is the mean of y?")
    page.locator("#analysis-run").click()
    expect(page.locator("#analysis-status")).to_contain_text("model turn(s)")
    status = page.locator("#analysis-status").inner_text()
    # a random model's answer comes without running code (said so), or the run hits the turn limit
    assert re.search(r"(answered( without running code)?|max_turns)( \([^)]*\))? · [12] model turn", status), status
    assert "prompt tokens" in status  # usage reported by the engine-backed model
    assert rec.requests == []  # the agent talks to the engine directly, not through the chat backend
    assert engine_backend.engine.stats()["tokens_generated"] > generated
