"""Start a server command as a subprocess on 127.0.0.1 and wait until it answers (for benchmarks and tests)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(threads: int = 2, **extra: str) -> dict[str, str]:
    """The current environment, offline (no hub access) and with the thread count pinned."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class ServerProcess:
    """A server subprocess with its output in `log_path`; `wait_ready` polls `ready_path` until it answers 200."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, ready_path: str = "/v1/models",
                 env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None):
        self.cmd, self.port, self.log_path, self.ready_path = cmd, port, log_path, ready_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env or offline_env(),
                                     cwd=cwd, start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, limit_s: float = 300.0) -> float:
        """Seconds until ready; raises RuntimeError (with the log's tail) if it exits or never answers."""
        start = time.monotonic()
        while time.monotonic() - start < limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2.0).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.cmd[0]} not ready after {limit_s} s: {self.log_tail()}")

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

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
