"""Real OpenAI-compatible servers on 127.0.0.1 for the bench tests (subprocesses, free ports)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Server:
    """A server subprocess; `wait_ready` polls a URL until it answers 200 or the process dies."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, ready_path: str = "/v1/models"):
        self.port, self.log_path, self.ready_path = port, log_path, ready_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=offline_env(),
                                     start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, limit_s: float = 240.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {limit_s} s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_puyu(args: list[str], timeout: float = 300.0, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """`python -m puyu.cli ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "puyu.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=offline_env(), cwd=cwd)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`puyu ARGS` in this process (saves an interpreter start per call): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from puyu.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()
