"""A sandboxed, stateful Python interpreter: one fresh worker process per run.

The parent side. `Sandbox.run(code)` sends a cell to the worker (`puyu/agent/worker.py`, started with `python -I`
under a small reaper, `puyu/agent/reaper.py`, in its own session and process group, with a scrubbed environment; the
reaper is a child subreaper and kills every process of the run when it ends, whatever group it moved to) and waits
for it with a select loop that enforces the limits from outside the worker:

- wall-clock timeout: SIGINT first (the cell gets KeyboardInterrupt and the variables survive); a cell that ignores
  it is killed with every process it started after a grace period, and the next cell gets a fresh worker;
- output cap: output beyond `output_limit_bytes` is discarded and the cell is interrupted like a timeout;
- a worker that dies (memory, `os._exit`, a crash) is reported and replaced on the next cell; so is one whose
  control pipe holds more than `CONTROL_LIMIT` bytes without a newline (user code can write to it).

Limits the worker applies to itself before user code runs: RLIMIT_AS/RLIMIT_DATA (memory), RLIMIT_FSIZE (file
size), a private network namespace (else Landlock TCP rules, else a patched `socket`), Landlock write access limited
to the working directory, the figures directory and a private temp directory, and a seccomp filter (no unix, raw or
netlink sockets, no chmod/chown/utime/xattr). `isolation` says what is in force.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .cgroup import RunCgroup, create_run_cgroup

WORKER_SOURCE = Path(__file__).with_name("worker.py")
REAPER_SOURCE = Path(__file__).with_name("reaper.py")


class SandboxError(RuntimeError):
    """The worker could not be started."""


@dataclass
class SandboxConfig:
    timeout_s: float = 60.0
    memory_mb: int = 2048
    output_limit_bytes: int = 20_000
    file_size_mb: int = 256
    interrupt_grace_s: float = 2.0
    start_timeout_s: float = 60.0
    block_network: bool = True
    use_namespaces: bool = True
    use_landlock: bool = True
    use_seccomp: bool = True  # x86_64: no unix/raw/netlink sockets, no chmod/chown/utime/xattr (see worker.py)
    restrict_reads: bool = True  # with Landlock: reads only from system/Python paths and the run folder
    use_cgroup: bool = True  # memory_mb and max_processes for the whole run, where a cgroup can be made (cgroup.py)
    max_processes: int = 128  # processes and threads of the run together (the cgroup's pids.max)

    def __post_init__(self) -> None:
        for name in ("timeout_s", "interrupt_grace_s", "start_timeout_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a positive number, got {getattr(self, name)!r}")
        for name in ("memory_mb", "output_limit_bytes", "file_size_mb", "max_processes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class CellResult:
    cell: int
    status: str  # ok | error | timeout | output_limit | memory_limit | crashed
    output: str
    error: Optional[str] = None
    figures: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    output_bytes: int = 0
    truncated: bool = False
    restarted: bool = False  # the worker was replaced after this cell: all variables are gone

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def copy_input_files(files: Iterable[str | Path], workdir: Path) -> list[Path]:
    """Copy the input files into the working directory (by base name); the originals are never handed out.

    Invariant: only regular files are read, never through a symlink (O_NOFOLLOW on the source), and a name already
    in the working directory is never followed either (O_NOFOLLOW on the copy)."""
    copies: list[Path] = []
    for f in files:
        src = Path(f)
        if not os.path.lexists(src):
            raise FileNotFoundError(f"{src}: input file does not exist or is not a file")
        if src.is_symlink():
            raise ValueError(f"{src}: input file is a symlink; pass the file itself")
        dst = workdir / src.name
        if dst in copies:
            raise ValueError(f"{src}: two input files share the name {src.name!r}")
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{src}: input file is not a regular file")
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with open(fd, "rb", closefd=False) as r, open(out, "wb") as w:
                shutil.copyfileobj(r, w, 1 << 20)
        finally:
            os.close(fd)
        copies.append(dst)
    return copies


class Sandbox:
    """One run's interpreter. Not shared between runs; `close()` (or `with`) ends the worker and its children."""

    def __init__(self, workdir: str | Path, figures_dir: str | Path | None = None,
                 config: Optional[SandboxConfig] = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.figures_dir = Path(figures_dir).resolve() if figures_dir else self.workdir
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        self.config = config or SandboxConfig()
        self.isolation: dict = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="puyu-sandbox-"))
        self._proc: Optional[subprocess.Popen] = None
        self._control: Optional[int] = None
        self._cgroup: Optional[RunCgroup] = None  # the running worker's, created and removed with it
        self._cells = 0
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Sandbox":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _running(self) -> tuple[subprocess.Popen, int]:
        """The worker process and the read end of its control pipe; only valid between start() and _kill()."""
        if self._proc is None or self._control is None:
            raise SandboxError("the interpreter worker is not running")
        return self._proc, self._control

    def start(self) -> dict:
        """Start the worker if it is not running; returns the isolation report."""
        if self._proc is not None:
            return self.isolation
        if self._closed:
            raise SandboxError("the sandbox is closed")
        read_fd, write_fd = os.pipe()
        cfg = {"control_fd": write_fd, "workdir": str(self.workdir), "figures_dir": str(self.figures_dir),
               "writable": [str(self.workdir), str(self.figures_dir), str(self._tmp)],
               "memory_bytes": self.config.memory_mb * 2**20, "file_size_bytes": self.config.file_size_mb * 2**20,
               "block_network": self.config.block_network, "use_namespaces": self.config.use_namespaces,
               "use_landlock": self.config.use_landlock, "use_seccomp": self.config.use_seccomp, "reaper": True,
               "restrict_reads": self.config.restrict_reads}
        run_limits = self._make_cgroup()
        join = ["--cgroup-procs", ",".join(self._cgroup.procs_files)] if self._cgroup else []
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", REAPER_SOURCE.read_text(), *join,
                 sys.executable, "-I", "-c", WORKER_SOURCE.read_text(), json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=[write_fd],
                cwd=self.workdir, env=self._worker_env(), start_new_session=True)
        finally:
            os.close(write_fd)
        self._control = read_fd
        ready = self._read_ready()
        self.isolation = {**ready["isolation"], "run_limits": run_limits}
        return self.isolation

    def _make_cgroup(self) -> dict:
        """The run's cgroup (memory and process caps over all its processes), or why there is none."""
        if not self.config.use_cgroup:
            return {"cgroup": None, "reason": "switched off (use_cgroup=False): per-process rlimits only"}
        self._cgroup, how = create_run_cgroup(self.config.memory_mb * 2**20, self.config.max_processes)
        return self._cgroup.describe() if self._cgroup else {"cgroup": None, "reason": how}

    def memory_limit_hit(self) -> bool:
        """Whether the run's cgroup memory cap killed one of its processes (False without a cgroup)."""
        return self._cgroup is not None and self._cgroup.oom_killed()

    def _worker_env(self) -> dict[str, str]:
        """A minimal environment: nothing of the parent's (tokens, proxies, keys) reaches user code."""
        tmp = str(self._tmp)
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir), "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8", "TMPDIR": tmp, "MPLBACKEND": "Agg", "MPLCONFIGDIR": tmp,
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _read_ready(self) -> dict:
        deadline = time.monotonic() + self.config.start_timeout_s
        buf, output = b"", b""
        while b"\n" not in buf:
            if time.monotonic() > deadline:
                self._kill()
                raise SandboxError(f"the interpreter worker did not start within {self.config.start_timeout_s} s")
            proc, control = self._running()
            assert proc.stdout is not None  # started with stdout=PIPE
            ready, _, _ = select.select([control, proc.stdout.fileno()], [], [], 0.1)
            if proc.stdout.fileno() in ready:
                output += os.read(proc.stdout.fileno(), 65536)
            if control in ready:
                chunk = os.read(control, 65536)
                if not chunk:
                    self._kill()
                    raise SandboxError(f"the interpreter worker failed to start: {output.decode(errors='replace')}")
                buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._kill()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _terminate(self) -> None:
        """End the run's processes: the reaper stops, kills and reaps every descendant of the worker (whatever
        session or group they moved to), then exits; if it does not within 10 s, its process group is killed."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def _kill(self) -> None:
        """Terminate the worker and everything it started, then close the pipes."""
        self._terminate()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self._control is not None:
            os.close(self._control)
            self._control = None
        group, self._cgroup = self._cgroup, None
        if group is not None:
            group.kill_all()  # belt and braces: the reaper has killed the tree; nothing of the run may remain
            group.remove()

    # ------------------------------------------------------------------------------------------- cells
    def run(self, code: str, timeout_s: Optional[float] = None) -> CellResult:
        """Run one cell (`timeout_s` overrides the configured limit for this cell); never raises for anything the
        code does."""
        if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
            raise ValueError(f"timeout_s: must be a positive number, got {timeout_s!r}")
        with self._lock:
            self.start()
            self._cells += 1
            cell = self._cells
            try:
                stdin = self._running()[0].stdin
                assert stdin is not None  # started with stdin=PIPE
                stdin.write((json.dumps({"cell": cell, "code": code}) + "\n").encode())
                stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the worker died; the wait loop reports it
            return _CellWaiter(self, cell, timeout_s or self.config.timeout_s).wait()


def _regular(path: Path) -> bool:
    """A regular file itself, not a symlink to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


CONTROL_LIMIT = 1 << 20  # bytes of control data without a newline before the cell is stopped


class _CellWaiter:
    """The select loop of one cell: collects output, enforces the timeout and the output cap."""

    def __init__(self, sandbox: Sandbox, cell: int, timeout_s: float) -> None:
        self.sb, self.cell, self.cfg, self.timeout_s = sandbox, cell, sandbox.config, timeout_s
        proc, self.control_fd = sandbox._running()
        assert proc.stdout is not None  # started with stdout=PIPE
        self.out_fd = proc.stdout.fileno()
        self.pid = proc.pid
        self.output = bytearray()
        self.out_open = True  # until the worker's stdout reaches EOF (user code may close fd 1)
        self.total = 0
        self.control = b""
        self.start = time.monotonic()
        self.reason: Optional[str] = None  # timeout | output_limit, once the cell was interrupted
        self.kill_at: Optional[float] = None

    def wait(self) -> CellResult:
        while True:
            now = time.monotonic()
            if self.reason is None and now - self.start > self.timeout_s:
                self._interrupt("timeout")
            if self.kill_at is not None and now > self.kill_at:
                return self._finish_dead(self.reason or "timeout")
            fds = [self.control_fd] + ([self.out_fd] if self.out_open else [])
            ready, _, _ = select.select(fds, [], [], 0.05)
            if self.out_fd in ready:
                self._read_output()
            if self.control_fd in ready:
                chunk = os.read(self.control_fd, 65536)
                if not chunk:
                    return self._finish_dead(self.reason or "crashed")
                self.control += chunk
                while b"\n" in self.control:
                    result = self._parse_result()
                    if result.get("cell") == self.cell:  # a line about another cell (stale or forged) is dropped
                        self._drain_output()
                        return self._finish(result)
                if len(self.control) > CONTROL_LIMIT:  # what is left has no newline: bounded, then stopped
                    return self._finish_dead("crashed", "ProtocolError: the cell flooded the control pipe")

    def _parse_result(self) -> dict:
        line, self.control = self.control.split(b"\n", 1)
        try:
            result = json.loads(line)
        except ValueError:
            result = None
        return result if isinstance(result, dict) else {}

    def _read_output(self) -> bool:
        chunk = os.read(self.out_fd, 65536)
        self.out_open = bool(chunk)
        self.total += len(chunk)
        room = self.cfg.output_limit_bytes - len(self.output)
        if room > 0:
            self.output += chunk[:room]
        if self.total > self.cfg.output_limit_bytes and self.reason is None:
            self._interrupt("output_limit")
        return bool(chunk)

    def _drain_output(self) -> None:
        """Read what is already in the pipe (bounded: a process that escaped the group may keep writing)."""
        deadline = time.monotonic() + 1.0
        while self.out_open and time.monotonic() < deadline and select.select([self.out_fd], [], [], 0)[0] \
                and self._read_output():
            pass

    def _interrupt(self, reason: str) -> None:
        self.reason = reason
        self.kill_at = time.monotonic() + self.cfg.interrupt_grace_s
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def _text(self) -> str:
        text = self.output.decode("utf-8", errors="replace")
        if self.total > len(self.output):
            text += f"\n[output truncated: {self.total} bytes in all, {self.cfg.output_limit_bytes} shown]"
        return text

    def _limit_message(self, reason: str) -> str:
        if reason == "timeout":
            return f"TimeoutError: the cell ran longer than {self.timeout_s:g} s and was stopped"
        if reason == "output_limit":
            return f"OutputLimitError: the cell printed more than {self.cfg.output_limit_bytes} bytes and was stopped"
        if reason == "memory_limit":
            return (f"MemoryError: the run used more than its {self.cfg.memory_mb} MiB (all its processes together) "
                    f"and the interpreter was killed")
        return "WorkerCrash: the interpreter process died (out of memory, a crash or os._exit)"

    def _figures(self, result: dict) -> list[str]:
        """Only real files in the figures folder: the control pipe is writable by user code, so its claims are
        checked."""
        root = self.sb.figures_dir
        paths = [Path(p) for p in result.get("figures", []) if isinstance(p, str)]
        return [str(p) for p in paths if p.parent == root and p.suffix == ".png" and _regular(p)]

    def _finish(self, result: dict) -> CellResult:
        error = result.get("error")
        error = error if isinstance(error, str) or error is None else str(error)
        status = "ok" if error is None else "error"
        if self.reason is not None:
            status, error = self.reason, self._limit_message(self.reason)
        return CellResult(self.cell, status, self._text(), error, self._figures(result),
                          round(time.monotonic() - self.start, 3), self.total, self.total > len(self.output))

    def _finish_dead(self, reason: str, message: Optional[str] = None) -> CellResult:
        self.sb._terminate()
        if reason == "crashed" and self.sb.memory_limit_hit():
            reason = "memory_limit"
        self._drain_output()
        self.sb._kill()
        error = (message or self._limit_message(reason)) + "; the interpreter was restarted and all variables were lost"
        return CellResult(self.cell, reason, self._text(), error, [], round(time.monotonic() - self.start, 3),
                          self.total, self.total > len(self.output), restarted=True)
