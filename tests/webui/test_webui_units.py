"""The web UI's plain parts: persona files, generation settings, transcript rendering, the conversation."""
from __future__ import annotations

from pathlib import Path

import pytest

from puyu.webui.chat import Conversation
from puyu.personas import PLAIN, Persona, load_personas, read_persona
from puyu.webui.settings import ChatSettings


def test_shipped_personas_load_with_default_first():
    personas = load_personas()
    names = [p.name for p in personas]
    assert names[-1] == PLAIN.name and "八戒" in names
    default = read_persona(Path(__file__).resolve().parents[2] / "configs" / "personas" / "default.yaml")
    assert personas[0] == default
    assert all(p.system and p.greeting for p in personas[:-1])


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "not valid YAML"),
    ("- a list", "expected a mapping"),
    ("system: hi", "field 'name' must be a non-empty string"),
    ("name: x\ngreeting: 3", "field 'greeting' must be a non-empty string"),
])
def test_bad_persona_files_name_the_file_and_field(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_personas(tmp_path)
    assert str(tmp_path / "bad.yaml") in str(info.value)


def test_duplicate_persona_names_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("name: Same\nsystem: one")
    (tmp_path / "b.yaml").write_text("name: Same\nsystem: two")
    with pytest.raises(ValueError, match="b.yaml: persona name 'Same' is used twice"):
        load_personas(tmp_path)


def test_missing_persona_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="persona directory not found"):
        load_personas(tmp_path / "nope")


def test_settings_from_the_page_are_typed_and_validated():
    s = ChatSettings.from_ui(64.0, 0.0, 1.0, 0.0, 1.0)
    assert s.max_new_tokens == 64 and isinstance(s.top_k, int)
    assert s.to_generation_config().greedy
    assert ChatSettings.from_ui(8, 0.7, 0.9, 5, 1.1).to_openai_kwargs() == {
        "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "extra_body": {"top_k": 5, "repetition_penalty": 1.1}}
    with pytest.raises(ValueError, match="top_p"):
        ChatSettings.from_ui(8, 0.7, 0.0, 5, 1.0)
    with pytest.raises(ValueError, match="max_new_tokens: a value is required"):
        ChatSettings.from_ui(None, 0.7, 0.5, 5, 1.0)


def test_conversation_request_has_system_then_history():
    conv = Conversation.start(Persona("P", "be brief", "hi there"))
    conv.messages.append({"role": "user", "content": "q"})
    assert conv.request() == [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "hi there"},
                              {"role": "user", "content": "q"}]
    assert Conversation.start(PLAIN).request() == []


def test_webui_without_gradio_says_which_extra(monkeypatch, capsys):
    """A core install (no Gradio) gets one line naming the extra, not an ImportError traceback."""
    import importlib.util

    from puyu.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real_find_spec(name, *a))
    assert main(["webui", "--no-agent"]) == 2
    err = capsys.readouterr().err
    assert "puyu[webui]" in err and "Traceback" not in err
