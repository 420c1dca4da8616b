"""The chat tab on a real `puyu serve` subprocess through the OpenAI SDK, and `puyu webui` itself as a subprocess."""
from __future__ import annotations

import json
import re

import openai
import pytest
from playwright.sync_api import expect

from puyu.testing import free_port
from webui_testlib import letters, puyu_process, running_app, send, upload
from puyu.tokenizer import Tokenizer
from puyu.webui.app import AppConfig
from puyu.webui.backends import OpenAIBackend
from puyu.personas import PLAIN, load_personas
from puyu.webui.settings import ChatSettings

PERSONAS = load_personas()  # the real ones of configs/personas
BAJIE = next(p for p in PERSONAS if p.name == "八戒")
GREEDY = ChatSettings(max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


def prompt_tokens(page) -> int:
    return int(re.search(r"prompt tokens: (\d+)", page.locator("#chat-status").inner_text()).group(1))


@pytest.fixture(scope="module")
def app(puyu_server):
    with running_app(OpenAIBackend(puyu_server), AppConfig(personas=PERSONAS, chat_defaults=GREEDY)) as url:
        yield url


def test_reply_streams_from_the_server_with_the_persona_prompt(app, puyu_server, page_factory,
                                                               internlm2_checkpoint):
    page = page_factory(app)
    page.locator("#chat-persona input").click()
    page.get_by_role("option", name="八戒").click()
    expect(page.locator("#chat-history [data-testid='bot']").first).to_contain_text(BAJIE.greeting[:8])
    send(page, "猴哥，师父被妖怪抓走了！")
    expect(page.locator("#chat-status")).to_contain_text("finish: length")
    expect(page.locator("#chat-status")).to_contain_text("generated tokens: 16")
    messages = [{"role": "system", "content": BAJIE.system}, {"role": "assistant", "content": BAJIE.greeting},
                {"role": "user", "content": "猴哥，师父被妖怪抓走了！"}]
    # the server counted exactly the prompt that the persona's system prompt, greeting and question render to
    tok = Tokenizer(internlm2_checkpoint)
    assert prompt_tokens(page) == len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
    # and the page shows what the server answers to that request
    client = openai.OpenAI(base_url=f"{puyu_server}/v1", api_key="none")
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                           max_tokens=16, temperature=0.0, top_p=1.0)
    shown = page.locator("#chat-history [data-testid='bot']").nth(1).inner_text()
    assert letters(shown) == letters(reply.choices[0].message.content)


def test_server_errors_are_shown_in_the_page(app, page_factory):
    page = page_factory(app)
    send(page, "hello " * 1000)
    expect(page.locator("#chat-error")).to_contain_text("server answered 400")
    expect(page.locator("#chat-error")).to_contain_text("2048")


def test_unreachable_server_is_reported(page_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    with running_app(OpenAIBackend(dead, model="m"), AppConfig(personas=[PLAIN])) as url:
        page = page_factory(url)
        send(page, "Hello")
        expect(page.locator("#chat-error")).to_contain_text(f"cannot reach {dead}/v1")


def test_puyu_webui_command_serves_chat_and_analysis(puyu_server, page_factory, tmp_path):
    replay = tmp_path / "replay.json"
    code = "import glob\\nprint('rows:', len(open(sorted(glob.glob('*.csv'))[0]).read().splitlines()) - 1)"
    replay.write_text(json.dumps(["Counting.<|action_start|><|interpreter|>\n```python\n" + code.replace("\\n", "\n")
                                  + "\n```<|action_end|>\n", "There are 2 rows."]))
    port = free_port()
    with puyu_process(["webui", "--api-url", puyu_server, "--server-port", str(port), "--agent-model",
                       f"replay:{replay}", "--runs-dir", str(tmp_path / "runs")], port, tmp_path / "webui.log",
                      "/") as proc:
        proc.wait_ready(180)
        page = page_factory(f"http://127.0.0.1:{port}/")
        expect(page.locator("#chat-backend")).to_contain_text(f"{puyu_server}/v1")
        send(page, "Hello")
        expect(page.locator("#chat-status")).to_contain_text("finish:")
        csv = tmp_path / "two.csv"
        csv.write_text("a,b\n1,2\n3,4\n")
        upload(page, csv)
        page.locator("#analysis-question textarea").fill("How many rows?")
        page.locator("#analysis-run").click()
        expect(page.locator("#analysis-status")).to_contain_text("answered")
        expect(page.locator("#analysis-steps")).to_contain_text("rows: 2")
        assert list((tmp_path / "runs").glob("*/run-001/work/two.csv"))


@pytest.mark.parametrize("args, message", [
    (["some-model", "--api-url", "http://127.0.0.1:1"], "either MODEL"),
    (["--api-url", "ftp://x"], "--api-url: expected an http(s) URL"),
    (["--server-port", "70000"], "--server-port: 70000"),
    (["--personas", "/nonexistent/personas"], "/nonexistent/personas: persona directory not found"),
    (["--api-url", "http://127.0.0.1:1", "--agent-model", "gpt"], "--agent-model: only 'replay:FILE'"),
])
def test_bad_command_lines_fail_with_one_line(args, message, capsys):
    from puyu.cli import main

    assert main(["webui", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
