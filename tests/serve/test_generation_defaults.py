"""One set of sampling defaults for the server, `puyu chat` and the web UI, and a reply cut by `length` marked."""
from __future__ import annotations

import io

from puyu.cli import build_parser
from puyu.config import DEFAULT_REPETITION_PENALTY, EngineConfig, GenerationConfig
from puyu.serve.cli import chat_generation_config
from puyu.serve.protocol import ChatCompletionRequest, CompletionRequest
from puyu.webui.chat import format_status
from puyu.webui.settings import ChatSettings

SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def picked(cfg: GenerationConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in SAMPLING)


def test_server_chat_and_webui_share_the_defaults():
    server = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    chat = chat_generation_config(build_parser().parse_args(["chat"]))
    webui = ChatSettings().to_generation_config()
    expected = picked(webui)
    assert picked(server.generation_config(8, None, True)) == expected
    assert picked(completion.generation_config(8, None, True)) == expected
    assert picked(chat) == expected and chat.max_new_tokens == webui.max_new_tokens
    assert expected[0] is True and expected[-1] == DEFAULT_REPETITION_PENALTY > 1.0  # sampling, a small penalty


def test_greedy_stays_plain_greedy_unless_a_penalty_is_asked_for():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "temperature": 0})
    assert req.generation_config(8, None, True).repetition_penalty == 1.0
    chat = chat_generation_config(build_parser().parse_args(["chat", "--temperature", "0"]))
    assert chat.greedy and chat.repetition_penalty == 1.0
    asked = chat_generation_config(build_parser().parse_args(["chat", "--temperature", "0",
                                                              "--repetition-penalty", "1.2"]))
    assert asked.repetition_penalty == 1.2


def test_terminal_chat_marks_a_reply_cut_by_length(internlm2_checkpoint):
    from puyu.engine import AsyncEngine
    from puyu.serve.chat import TerminalChat
    from puyu.personas import Persona

    lines = iter(["hello there", "/exit"])
    out = io.StringIO()
    with AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=256, cache_max_entry_count=32)) as engine:
        chat = TerminalChat(engine, GenerationConfig(max_new_tokens=3, ignore_eos=True), Persona(),
                            read=lambda prompt: next(lines), out=out)
        assert chat.run() == 0
    assert "(reply cut at 3 tokens: --max-new-tokens raises the limit)" in out.getvalue()
    assert chat.conv.messages[-1]["role"] == "assistant"  # the cut reply stays in the history


def test_webui_status_marks_a_cut_reply():
    assert "reply cut" in format_status("length", 5, 3) and "reply cut" not in format_status("stop", 5, 3)
