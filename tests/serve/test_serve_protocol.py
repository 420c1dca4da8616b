"""Request validation, error shapes, tool-call rendering and parsing (whole and streamed), metrics, options."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from puyu.config import EngineConfig
from puyu.serve.errors import from_validation_errors
from puyu.serve.metrics import ServerMetrics, read_stats
from puyu.serve.protocol import ChatCompletionRequest, CompletionRequest
from puyu.serve.tools import ToolStreamParser, parse_reply, to_internlm2_messages

USER = [{"role": "user", "content": "hi"}]
CALL1 = '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Shanghai"}}<|action_end|>'
CALL2 = '<|action_start|><|plugin|>\n{"name": "get_time", "arguments": {"tz": "UTC+8"}}<|action_end|>'


def error_of(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body",) + tuple(e["loc"])} for e in info.value.errors()]
    return from_validation_errors(errors).body()["error"]


@pytest.mark.parametrize("body, param, words", [
    ({"messages": USER}, "model", "missing required field 'model'"),
    ({"model": "m"}, "messages", "missing required field 'messages'"),
    ({"model": "m", "messages": USER, "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
    ({"model": "m", "messages": USER, "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"model": "m", "messages": USER, "response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"model": "m", "messages": USER, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "m", "messages": USER, "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "m", "messages": USER, "n": 0}, "n", "greater than or equal to 1"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'user'"),
    ({"model": "m", "messages": []}, "messages", "at least 1 item"),
])
def test_serve_chat_request_errors_name_the_field(body, param, words):
    err = error_of(ChatCompletionRequest, body)
    assert err["param"] == param
    assert words in err["message"]
    assert err["type"] == "invalid_request_error"


def test_serve_null_for_unsupported_field_is_accepted_and_values_map_to_generation_config():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "logit_bias": None, "seed": 7,
                                                "temperature": 0, "stop": "END", "top_k": 5, "n": 2,
                                                "repetition_penalty": 1.1, "min_new_tokens": 2, "ignore_eos": True})
    cfg = req.generation_config(10, None, True, choice=1)
    assert (cfg.do_sample, cfg.random_seed, cfg.stop_words, cfg.top_k, cfg.max_new_tokens) == (False, 8, ["END"], 5, 10)
    assert (cfg.repetition_penalty, cfg.min_new_tokens, cfg.ignore_eos) == (1.1, 2, True)
    sampled = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "temperature": 0.7, "top_p": 0.9})
    cfg = sampled.generation_config(10, 2, False)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.logprobs, cfg.skip_special_tokens) == (True, 0.7, 0.9, 2,
                                                                                                   False)


def test_serve_completion_prompt_forms_and_lmdeploy_fields():
    assert CompletionRequest.model_validate({"model": "m", "prompt": "a"}).prompts() == ["a"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    # what lmdeploy's APIClient.completions_v1 sends by default is accepted
    CompletionRequest.model_validate({"model": "m", "prompt": "a", "suffix": None, "session_id": -1, "top_k": 40,
                                      "spaces_between_special_tokens": True, "stream_options": None, "user": None})
    assert error_of(CompletionRequest, {"model": "m", "prompt": "a", "suffix": "z"})["param"] == "suffix"
    assert error_of(CompletionRequest, {"model": "m", "prompt": ""})["message"] == "'prompt' must not be empty"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "a", "stream_options": {"include_usage": True}})


def test_serve_malformed_and_non_object_bodies():
    bad_json = [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                 "ctx": {"error": "Expecting value"}}]
    err = from_validation_errors(bad_json).body()["error"]
    assert err["code"] == "invalid_json" and "malformed JSON" in err["message"]
    not_object = [{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary"}]
    assert "JSON object" in from_validation_errors(not_object).body()["error"]["message"]


def test_serve_tools_render_as_internlm2_turns():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"id": "c1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})
    msgs = to_internlm2_messages(req.messages, req.tools)
    assert [m["role"] for m in msgs] == ["system", "system", "user", "assistant", "environment"]
    assert msgs[0]["content"] == "be brief" and msgs[1]["name"] == "plugin"
    assert json.loads(msgs[1]["content"])[0]["name"] == "get_weather"
    assert msgs[3]["content"] == CALL1.replace("Shanghai", "Paris")
    assert msgs[4] == {"role": "environment", "name": "plugin", "content": "sunny"}


def test_serve_parse_two_calls_and_invalid_json():
    two = parse_reply("Let me look." + CALL1 + CALL2 + "<|im_end|>")
    assert two.content == "Let me look." and two.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in two.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(two.tool_calls[1]["function"]["arguments"]) == {"tz": "UTC+8"}
    assert two.tool_calls[0]["id"] != two.tool_calls[1]["id"]
    bad = parse_reply('Hmm<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {city}<|action_end|>')
    assert bad.tool_calls == [] and bad.finish_reason == "stop"
    assert bad.content == 'Hmm\n{"name": "get_weather", "parameters": {city}' and "not valid JSON" in bad.error
    assert parse_reply("<|action_start|><|plugin|>\n[1, 2]").error == "tool call JSON has no 'name'"
    assert parse_reply("plain answer<|im_end|>").content == "plain answer"


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_serve_stream_parser_matches_whole_parse_at_any_split(step):
    reply = "Let me look." + CALL1 + CALL2
    parser = ToolStreamParser()
    content = "".join(parser.feed(reply[i:i + step]) for i in range(0, len(reply), step))
    end = parser.finish()
    assert content + (end.content or "") == "Let me look."
    assert [c["function"]["arguments"] for c in end.tool_calls] == \
        [c["function"]["arguments"] for c in parse_reply(reply).tool_calls]
    # an almost-marker that is not one is released as content
    plain = ToolStreamParser()
    text = "a <|action_st b"
    assert "".join(plain.feed(ch) for ch in text) + (plain.finish().content or "") == text


def test_serve_metrics_from_engine_stats():
    stats = {"running": 2, "waiting": 1, "blocks_total": 10, "blocks_used": 4, "blocks_free": 6,
             "prefix_cache_queries": 8, "prefix_cache_hits": 2, "device": "cpu"}
    assert read_stats(stats)["blocks_used"] == 4.0 and "device" not in read_stats(stats)
    m = ServerMetrics(lambda: stats)
    m.ttft.observe(0.02)
    text = m.render().decode()
    for line in ("puyu_requests_running 2.0", "puyu_requests_waiting 1.0", "puyu_kv_blocks_used 4.0",
                 "puyu_prefix_cache_hit_rate 0.25", "puyu_kv_cache_usage_ratio 0.4",
                 "puyu_time_to_first_token_seconds_count 1.0"):
        assert line in text


def test_serve_metrics_survive_a_failing_stats_call():
    def broken():
        raise RuntimeError("engine gone")

    assert "puyu_time_to_first_token_seconds" in ServerMetrics(broken).render().decode()


def test_every_engine_config_field_is_a_flag_with_help():
    """The engine flags are generated from EngineConfig: a field added there is an option of serve/chat/bench."""
    import argparse
    import dataclasses

    from puyu.config import EngineConfig
    from puyu.serve.options import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    flags = {a.dest: a for a in parser._actions}
    samples = {"quant_policy": "8", "session_len": "300", "cache_block_seq_len": "32", "cache_max_entry_count": "12",
               "max_batch_size": "5", "max_prefill_token_num": "99", "device": "cuda:1", "dtype": "bfloat16",
               "tp": "2", "num_threads": "3", "kernels": "torch"}
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f.name in flags and flag in flags[f.name].option_strings and flags[f.name].help, f.name
        argv = [f"--no-{flag[2:]}"] if isinstance(f.default, bool) else [flag, samples[f.name]]
        got = getattr(engine_config_from_args(parser.parse_args(argv)), f.name)
        want = (not f.default) if isinstance(f.default, bool) else type(got)(samples[f.name])
        assert got == want, (f.name, got)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int3"])  # choices come from the field too


def test_serve_engine_options_from_file_and_flags(tmp_path):
    import argparse

    from puyu.serve.options import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cfg_file = tmp_path / "engine.yaml"
    cfg_file.write_text("quant_policy: 8\nsession_len: 1024\ncache_max_entry_count: 0.3\n")
    cfg = engine_config_from_args(parser.parse_args(["--config", str(cfg_file), "--session-len", "512"]))
    assert (cfg.quant_policy, cfg.session_len, cfg.cache_max_entry_count) == (8, 512, 0.3)
    assert engine_config_from_args(parser.parse_args(["--cache-max-entry-count", "128"])).cache_max_entry_count == 128
    cfg_file.write_text("quant_policy: 3\n")
    with pytest.raises(ValueError, match="engine.yaml: quant_policy"):
        engine_config_from_args(parser.parse_args(["--config", str(cfg_file)]))
    cfg_file.write_text("bogus_option: 1\n")
    with pytest.raises(ValueError, match="bogus_option"):
        engine_config_from_args(parser.parse_args(["--config", str(cfg_file)]))
    cfg_file.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        engine_config_from_args(parser.parse_args(["--config", str(cfg_file)]))


def test_serve_turbomind_mapping_against_lmdeploy_config_class():
    from puyu.serve.turbomind import turbomind_engine_config, turbomind_options

    ours = EngineConfig(quant_policy=8, session_len=4096, cache_max_entry_count=0.4, cache_block_seq_len=128,
                        max_batch_size=32, max_prefill_token_num=4096, enable_prefix_caching=True, device="cuda",
                        dtype="bfloat16", tp=2)
    options = turbomind_options(ours)
    assert options["quant_policy"] == 8 and options["cache_block_seq_len"] == 128 and options["tp"] == 2
    with pytest.raises(ValueError, match="cache_max_entry_count"):
        turbomind_options(EngineConfig(cache_max_entry_count=100, device="cuda"))
    with pytest.raises(ValueError, match="device"):
        turbomind_options(EngineConfig())
    with pytest.raises(ValueError, match="dtype"):
        turbomind_options(EngineConfig(dtype="float32", device="cuda"))
    lmdeploy_messages = pytest.importorskip("lmdeploy.messages", reason="LMDeploy is not installed")
    tm = turbomind_engine_config(ours)
    assert isinstance(tm, lmdeploy_messages.TurbomindEngineConfig)
    for name, value in options.items():  # every option landed on a real field with our value
        assert getattr(tm, name) == value, name
