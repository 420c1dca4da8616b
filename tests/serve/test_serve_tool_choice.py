"""`tool_choice` enforced on the random-weight `puyu-tiny` (whose free replies never form a call): `required` and a
named function always yield a parseable InternLM2 call whose arguments match the function's JSON schema, returned
as `tool_calls` with finish_reason `tool_calls` and no markup in `content`; `none` never calls."""
from __future__ import annotations

import json

import openai
import pytest

from puyu.config import EngineConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread
from puyu.tiny import puyu_tiny_path
from serve_testlib import conforms

MODEL = "puyu-tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris, and convert 3 EUR to USD."}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}
CONVERT = {"type": "object", "properties": {"amount": {"type": "integer", "minimum": 0, "maximum": 1000},
                                            "to": {"enum": ["USD", "JPY"]}}, "required": ["amount", "to"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "convert", "parameters": CONVERT}}]
SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(puyu_tiny_path(tmp_path_factory.mktemp("models")),
                         EngineConfig(session_len=1024, cache_max_entry_count=256, cache_block_seq_len=16))
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    engine.close()


def check_calls(choice, names) -> None:
    assert choice.finish_reason == "tool_calls", choice.message
    assert not choice.message.content or "<|" not in choice.message.content
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in names
        assert conforms(json.loads(call.function.arguments), SCHEMAS[call.function.name]), call.function.arguments


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2), (1.3, 3)])
def test_serve_tool_choice_required_always_calls(client, temperature, seed):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=temperature, seed=seed, max_tokens=200)
    check_calls(reply.choices[0], SCHEMAS)


@pytest.mark.parametrize("name", ["get_weather", "convert"])
def test_serve_tool_choice_named_calls_that_function(client, name):
    for seed in (4, 5):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                               max_tokens=200,
                                               tool_choice={"type": "function", "function": {"name": name}})
        check_calls(reply.choices[0], {name})


def test_serve_tool_choice_required_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=1.0, seed=9, max_tokens=200, stream=True)
    chunks = list(stream)
    assert "<|" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name in SCHEMAS
    assert conforms(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_serve_tool_choice_required_with_n(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=21, max_tokens=200, n=3, parallel_tool_calls=False)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        check_calls(choice, SCHEMAS)
        assert len(choice.message.tool_calls) == 1


def test_serve_tool_choice_none_never_calls(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                           temperature=1.0, seed=3, max_tokens=30)
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")


def test_serve_forced_call_with_response_format_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=5)
