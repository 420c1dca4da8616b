"""`puyu chat --image FILE`: the image goes with the first question and stays in the history; bad files and
text-only models are one-line CLI errors naming the file / the model."""
from __future__ import annotations

import io
import subprocess
import sys

from puyu.config import EngineConfig, GenerationConfig
from puyu.testing import random_image


def test_chat_with_an_image_matches_the_pipeline(xcomposer2_checkpoint):
    from puyu.engine import AsyncEngine
    from puyu.engine.pipeline import Pipeline
    from puyu.serve.chat import TerminalChat
    from puyu.personas import Persona

    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    image = random_image(1)
    lines = iter(["What is it?", "And the colours?", "/reset", "What is it?", "/quit"])
    out = io.StringIO()
    with AsyncEngine(xcomposer2_checkpoint, EngineConfig(dtype="float32", session_len=512,
                                                         cache_max_entry_count=128)) as engine:
        chat = TerminalChat(engine, gen, Persona(), read=lambda prompt: next(lines), out=out, image=image)
        replies = []
        original = chat.turn

        def turn(text: str) -> None:
            original(text)
            replies.append(chat.conv.messages[-1]["content"])

        chat.turn = turn
        assert chat.run() == 0
        expected = Pipeline(engine)(("What is it?", image), gen).text
        without = Pipeline(engine)([{"role": "user", "content": "What is it?"}], gen).text
    assert replies[0] == expected == replies[2]  # after /reset the image goes with the new first question
    assert replies[0] != without
    first_user = chat.conv.messages[0]["content"]
    assert isinstance(first_user, list) and first_user[0]["type"] == "image"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puyu.cli", "chat", *args], capture_output=True, text=True,
                          timeout=300, input="/quit\n")


def test_chat_image_errors_are_one_line(tmp_path, internlm2_checkpoint):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not a picture")
    bad = _run(str(internlm2_checkpoint), "--image", str(bogus))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"puyu: error: --image ({bogus}): not an image (PNG, JPEG, WebP, GIF or BMP expected)"
    missing = _run(str(internlm2_checkpoint), "--image", str(tmp_path / "gone.png"))
    assert missing.returncode == 2 and "gone.png: no such image file" in missing.stderr
    good = tmp_path / "ok.png"
    random_image(2).save(good)
    text_only = _run(str(internlm2_checkpoint), "--image", str(good), "--cache-max-entry-count", "32")
    assert text_only.returncode == 2 and "Traceback" not in text_only.stderr
    assert "has no vision" in text_only.stderr and internlm2_checkpoint.name in text_only.stderr
