"""The model registry (configs/models/*.yaml), `puyu models`, and download errors that need no server."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from puyu.cli import main
from puyu.download import RegistryError, UnknownModelError, is_complete_model, load_registry, lookup
from puyu.download.registry import models_dir

EXPECTED = {"internlm2-chat-1_8b", "internlm2-chat-7b", "internlm2-chat-1_8b-sft", "bajie-chat-1_8b",
            "internlm-xcomposer2-vl-7b", "internlm-xcomposer2-7b", "puyu-tiny"}


def test_registry_has_the_models_we_serve() -> None:
    registry = load_registry()
    assert EXPECTED <= set(registry)
    assert registry["internlm2-chat-7b"].repos["huggingface"] == "internlm/internlm2-chat-7b"
    assert registry["internlm-xcomposer2-vl-7b"].repos["huggingface"] == "internlm/internlm-xcomposer2-vl-7b"
    assert registry["internlm-xcomposer2-7b"].repos["huggingface"] == "internlm/internlm-xcomposer2-7b"
    # 490 px -> 35 x 35 image tokens (VL), 224 px -> 16 x 16 (composition)
    sizes = registry["internlm-xcomposer2-vl-7b"].image_size, registry["internlm-xcomposer2-7b"].image_size
    assert sizes == (490, 224)
    assert registry["puyu-tiny"].builtin and not registry["puyu-tiny"].repos
    for entry in registry.values():
        assert entry.builtin or entry.default_source in ("huggingface", "modelscope"), entry.name
        entry.generation_config()  # valid GenerationConfig values


def test_bajie_has_its_persona() -> None:
    bajie = lookup("bajie-chat-1_8b")
    assert bajie.persona is not None and "俺老猪" in bajie.persona.system and bajie.persona.greeting
    assert bajie.repos["modelscope"] == "JimmyMa99/BaJie-Chat-mini"
    assert lookup("internlm2-chat-7b").persona.greeting.startswith("你好")


def test_persona_reference_to_a_missing_file_names_it(tmp_path: Path) -> None:
    folder = _copy_registry(tmp_path)
    path = folder / "bajie-chat-1_8b.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("persona: bajie", "persona: wukong"), encoding="utf-8")
    with pytest.raises(RegistryError, match="persona: no persona file .*wukong.yaml"):
        load_registry(folder)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="'internlm2-chat-1_8b'"):
        lookup("InternLM2-Chat-1.8B")
    with pytest.raises(UnknownModelError) as info:
        lookup("qwen-72b-chat")
    assert "did you mean" not in str(info.value) and "puyu models" in str(info.value)


def _copy_registry(tmp_path: Path) -> Path:
    """configs/models and configs/personas, copied so a test can break one file."""
    folder = tmp_path / "configs" / "models"
    shutil.copytree(models_dir(), folder)
    shutil.copytree(models_dir().parent / "personas", folder.parent / "personas")
    return folder


@pytest.mark.parametrize("edit, field", [
    (lambda s: s + "favourite_colour: pink\n", "favourite_colour"),
    (lambda s: s.replace("internlm/internlm2-chat-7b", "internlm2-chat-7b"), "repos.huggingface"),
    (lambda s: s.replace("temperature: 0.8", "temperature: -1"), "generation.temperature"),
    (lambda s: s.replace("name: internlm2-chat-7b", "name: other"), "name"),
    (lambda s: s.replace("architecture: InternLM2ForCausalLM\n", ""), "architecture"),
])
def test_bad_registry_file_names_the_file_and_field(tmp_path: Path, edit, field: str) -> None:
    folder = _copy_registry(tmp_path)
    path = folder / "internlm2-chat-7b.yaml"
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        load_registry(folder)
    assert str(path) in str(info.value) and f" {field}:" in str(info.value)


def test_models_command_lists_and_shows(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in EXPECTED)
    assert main(["models", "bajie-chat-1_8b"]) == 0
    assert "俺老猪" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    assert {e["name"] for e in json.loads(capsys.readouterr().out)} >= EXPECTED
    assert main(["models", "bajie"]) == 2
    assert "did you mean 'bajie-chat-1_8b'" in capsys.readouterr().err


def test_is_complete_model(tmp_path: Path, internlm2_checkpoint: Path) -> None:
    assert is_complete_model(internlm2_checkpoint)
    partial = tmp_path / "partial"
    shutil.copytree(internlm2_checkpoint, partial)
    (partial / "model-00002-of-00002.safetensors").unlink()
    assert not is_complete_model(partial)


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", **env)
    return subprocess.run([sys.executable, *args], env=clean, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed here")
def test_modelscope_without_its_package_is_a_clear_error(tmp_path: Path) -> None:
    result = _run(["-m", "puyu.cli", "download", "bajie-chat-1_8b"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install modelscope" in result.stderr and "JimmyMa99/BaJie-Chat-mini" in result.stderr


def test_offline_mode_and_model_not_cached_is_a_clear_error(tmp_path: Path) -> None:
    code = "from puyu.resolve import resolve_model_path; resolve_model_path('internlm2-chat-1_8b')"
    result = _run(["-c", code], tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 1 and "OfflineError" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "puyu download internlm2-chat-1_8b" in result.stderr
    cli = _run(["-m", "puyu.cli", "download", "internlm2-chat-1_8b"], tmp_path, HF_HUB_OFFLINE="1")
    assert cli.returncode == 2 and "HF_HUB_OFFLINE=1" in cli.stderr and "Traceback" not in cli.stderr


def test_registry_personas_are_the_chat_personas() -> None:
    """One Persona type: the registry's, `puyu chat --persona` and the web UI's are the same objects' kind, read by
    the same reader; serve and download no longer import the web UI to get it."""
    import subprocess
    import sys

    from puyu.personas import DEFAULT_PERSONA_DIR, Persona, read_persona

    bajie = lookup("bajie-chat-1_8b").persona
    assert isinstance(bajie, Persona) and bajie == read_persona(DEFAULT_PERSONA_DIR / "bajie.yaml")
    probe = ("import sys, puyu.serve.chat, puyu.serve.cli, puyu.download.registry; "
             "print(sorted(m for m in sys.modules if m.startswith('puyu.webui')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
