"""`puyu chat` driven through a pseudo-terminal, and `puyu serve` as a real subprocess."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import openai
import pytest

from puyu.config import EngineConfig, GenerationConfig
from puyu.testing import ServerProcess, free_port
from serve_testlib import chain_ids, script_checkpoint, scripted_checkpoint

ENGINE_FLAGS = ["--session-len", "2048", "--cache-max-entry-count", "256", "--cache-block-seq-len", "16"]
REPLY_TEXT = 'Sure.{"name": "get_weather"}'  # the scripted reply with special tokens skipped


@pytest.fixture(scope="module")
def scripted(checkpoint_factory, tmp_path_factory):
    return scripted_checkpoint(checkpoint_factory("internlm2", "fp16"), tmp_path_factory.mktemp("chat") / "m")


class Terminal:
    """A subprocess on a pseudo-terminal, with a minimal expect()."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()

        def controlling_terminal() -> None:  # so that Ctrl-C typed on the terminal becomes SIGINT
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=controlling_terminal)
        os.close(slave)
        self.buffer = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` appears; returns everything read up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{text!r} not seen; terminal shows:\n{self.buffer}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.buffer += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    continue
        head, _, self.buffer = self.buffer.partition(text)
        return head + text

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # a failed test leaves no chat running
            self.proc.kill()


def test_serve_chat_in_a_terminal(scripted):
    with Terminal([sys.executable, "-m", "puyu.cli", "chat", str(scripted), "--persona", "bajie",
                   "--backend", "native", "--max-new-tokens", "40", *ENGINE_FLAGS]) as term:
        term.expect("俺老猪")  # 八戒's greeting
        term.expect("user> ")
        term.send("你好，八戒")
        assert REPLY_TEXT in term.expect("user> ")
        term.send("再说一遍")  # a second turn on the same history
        assert REPLY_TEXT in term.expect("user> ")
        term.send("/reset")
        term.expect("(history cleared)")
        term.expect("user> ")
        term.send("/help")
        term.expect("/reset")
        term.send("/exit")
        assert term.close() == 0


def test_serve_chat_ctrl_c_stops_the_reply_not_the_chat(checkpoint_factory, tmp_path):
    import shutil

    from puyu.tokenizer import Tokenizer

    endless = tmp_path / "endless"
    shutil.copytree(checkpoint_factory("internlm2", "fp16"), endless)
    tok = Tokenizer(endless)
    loop = chain_ids(tok, "assistant\n", "Paris") + tok.encode("P", add_special_tokens=False)  # ...ParisParis...
    script_checkpoint(endless, [loop])
    with Terminal([sys.executable, "-m", "puyu.cli", "chat", str(endless), "--backend", "native",
                   "--max-new-tokens", "4000", "--session-len", "4096", "--cache-max-entry-count", "300",
                   "--cache-block-seq-len", "16"]) as term:
        term.expect("user> ")
        term.send("go on forever")
        term.expect("ParisParisParis")  # streaming has started
        os.write(term.master, b"\x03")
        term.expect("(reply stopped)")
        term.expect("user> ")
        term.send("/exit")
        assert term.close() == 0


def test_serve_chat_keeps_multi_turn_history(scripted):
    from puyu.engine import AsyncEngine
    from puyu.serve.chat import TerminalChat
    from puyu.personas import Persona

    lines = iter(["first question", "second question", "/reset", "third", "/quit", "never read"])
    out = io.StringIO()
    with AsyncEngine(scripted, EngineConfig(session_len=256, cache_max_entry_count=64)) as engine:
        chat = TerminalChat(engine, GenerationConfig(max_new_tokens=40), Persona("t", "Be brief.", "Hi!"),
                            read=lambda prompt: next(lines), out=out)
        seen = []
        original = chat.turn

        def turn(text: str) -> None:
            original(text)
            seen.append([m["role"] for m in chat.conv.messages])

        chat.turn = turn
        assert chat.run() == 0
    assert seen[0] == ["system", "assistant", "user", "assistant"]
    assert seen[1] == ["system", "assistant", "user", "assistant", "user", "assistant"]
    assert seen[2] == ["system", "assistant", "user", "assistant"]  # after /reset: persona only, then one turn
    assert chat.conv.messages[-1]["content"] == REPLY_TEXT
    assert out.getvalue().count(REPLY_TEXT) == 3


def test_serve_chat_history_overflow_is_reported_not_a_crash(scripted):
    from puyu.engine import AsyncEngine
    from puyu.serve.chat import TerminalChat
    from puyu.personas import Persona

    lines = iter(["word " * 400, "/exit"])
    out = io.StringIO()
    with AsyncEngine(scripted, EngineConfig(session_len=128, cache_max_entry_count=32)) as engine:
        chat = TerminalChat(engine, GenerationConfig(max_new_tokens=4), Persona(),
                            read=lambda prompt: next(lines), out=out)
        assert chat.run() == 0
    assert "longer than session_len 128" in out.getvalue() and "/reset" in out.getvalue()
    assert chat.conv.messages == []


def test_serve_cli_serves_with_api_key_and_stops_on_sigint(scripted, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(scripted), "--server-port", str(port), "--api-keys", "secret",
           "--model-name", "m", "--backend", "native", "--log-level", "warning", "--max-request-bytes", "4096",
           "--allowed-origins", "https://ui.example", *ENGINE_FLAGS]
    with ServerProcess(cmd, port, tmp_path / "serve.log", "/health", env=dict(os.environ)) as server:
        server.wait_ready(120)  # start-up, not a measured timing
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=40)
        assert reply.choices[0].message.content == REPLY_TEXT
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
        import httpx

        base, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer secret"}
        assert httpx.get(base + "/metrics").status_code == 401 and httpx.get(base + "/health").status_code == 200
        big = httpx.post(base + "/v1/completions", json={"model": "m", "prompt": "x" * 5000}, headers=key)
        assert big.status_code == 413 and "--max-request-bytes" in big.json()["error"]["message"]
        assert httpx.get(base + "/health", headers={"Host": "rebind.example"}).status_code == 400
        assert httpx.get(base + "/v1/models", headers={**key, "Origin": "https://evil.example"}).status_code == 403
        ok = httpx.get(base + "/v1/models", headers={**key, "Origin": "https://ui.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0
        assert "puyu serve: m (native backend)" in server.log_tail()


def test_serve_cli_errors_are_one_line(tmp_path):
    from puyu.serve.turbomind import unavailable_reason

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "puyu.cli", *args], capture_output=True, text=True, timeout=120)

    bad = run("chat", "--persona", "nobody")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        bad.stderr.strip()] and "no persona 'nobody'" in bad.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nsystem: [unclosed\n")
    bad = run("chat", "--persona", str(broken))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"puyu: error: {broken}: not valid YAML" + bad.stderr.strip().split("not valid YAML", 1)[1]]
    port = run("serve", "--server-port", "70000")
    assert port.returncode == 2 and "--server-port" in port.stderr and "Traceback" not in port.stderr
    if unavailable_reason() is not None:
        tm = run("serve", "--backend", "turbomind")
        assert tm.returncode == 2 and "Traceback" not in tm.stderr
        assert tm.stderr.strip() == f"puyu: error: --backend turbomind: {unavailable_reason()}"
