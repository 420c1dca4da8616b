"""Helpers for the bench tests: real servers on 127.0.0.1 (see puyu.bench.server_proc) and CLI runs."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

from puyu.bench.server_proc import ServerProcess as Server  # noqa: F401 - re-exported for the tests
from puyu.bench.server_proc import free_port, offline_env  # noqa: F401

VENV_BIN = Path(sys.executable).parent


def run_puyu(args: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`python -m puyu.cli ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "puyu.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=offline_env())


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`puyu ARGS` in this process (saves an interpreter start per call): (exit code, stdout, stderr)."""
    from puyu.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()
