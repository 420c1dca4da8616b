"""Tool calls end to end: a scripted tiny InternLM2 checkpoint (see serve_testlib) answers with an InternLM2 plugin
call, through the real engine and server; the openai SDK sees `tool_calls` (whole and streamed) and sends the result
back as a `role: tool` message."""
from __future__ import annotations

import json

import openai
import pytest

from puyu.config import EngineConfig
from puyu.testing import openai_client, serving
from puyu.chat_templates import INTERNLM2_CHAT_TEMPLATE
from puyu.tokenizer import render_chat
from serve_testlib import scripted_checkpoint

MODEL = "scripted"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted_dir(checkpoint_factory, tmp_path_factory):
    return scripted_checkpoint(checkpoint_factory("internlm2", "fp16"), tmp_path_factory.mktemp("scripted") / "m")


@pytest.fixture(scope="module")
def server(scripted_dir):
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(scripted_dir, EngineConfig(session_len=512, cache_max_entry_count=128,
                                                    cache_block_seq_len=16))
    with serving(engine, MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_serve_tool_call_whole(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {}
    assert call.id.startswith("call_")


def test_serve_tool_call_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Sure."  # no markup leaks into the streamed content
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == [(0, "get_weather", "{}")]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0


def test_serve_tool_round_trip_renders_the_result_as_environment_turn(client, server):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=40)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0,
                                            max_tokens=40)
    assert second.choices[0].finish_reason == "tool_calls"
    # the prompt the server built: tool list as a plugin system turn, the call in the assistant turn, the result
    # as an environment turn (InternLM2 protocol); its token count is what usage reports
    expected = render_chat(INTERNLM2_CHAT_TEMPLATE, [
        {"role": "system", "name": "plugin", "content": json.dumps([t["function"] for t in TOOLS])},
        ASK[0],
        {"role": "assistant", "content": 'Sure.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {}}'
                                         '<|action_end|>'},
        {"role": "environment", "name": "plugin", "content": '{"temperature": 21}'},
    ], True, bos_token="<s>")
    assert "<|im_start|>environment name=<|plugin|>\n" in expected
    tok = server.engine.tokenizer
    assert second.usage.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))


def test_serve_named_tool_choice_is_enforced(client):
    """The scripted model answers a forced named call with broken JSON (BAD_REPLY); the grammar overrides it: the
    reply is a call with arguments that match the function's (empty) schema, whole and streamed."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=40,
                                           tool_choice=named)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {}
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=40,
                                            stream=True, tool_choice=named)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_weather", {})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("max_tokens", [3, 5, 7, 9])
def test_serve_cut_tool_call_leaks_no_markup(client, max_tokens):
    """A call cut by max_tokens cannot be parsed: it comes back as content without protocol markup."""
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                           max_tokens=max_tokens)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert "<|" not in (choice.message.content or "")
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                            max_tokens=max_tokens, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in stream)
    assert "<|" not in content and content == (choice.message.content or "")


def test_serve_tool_choice_none_and_required(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=40)
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls
    assert plain.choices[0].message.content.startswith("Sure.")  # special tokens skipped, nothing parsed
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "other"}})
