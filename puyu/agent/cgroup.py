"""A cgroup per sandbox run: one memory cap and one process cap for everything the run's code starts.

RLIMIT_AS caps each process on its own, so a memfd or a few children together pass it; a cgroup counts the whole run
(every descendant joins it at fork and cannot leave: moving needs write access to cgroup files, which Landlock and
the seccomp filter deny). cgroup v2 is used where this process's own cgroup may have children with the memory and
pids controllers (a delegated subtree); otherwise cgroup v1's memory and pids hierarchies, where they are mounted
and writable. Neither: `create_run_cgroup` says why, and the run keeps the per-process rlimits only.

Invariant: the reaper writes its own pid into `procs_files` before it forks the worker, so no process of the run
starts outside the cgroup; `kill_all` then `remove` end it.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class RunCgroup:
    version: int  # 1 or 2
    dirs: list[Path]  # v2: the run's one folder; v1: its memory folder, then its pids folder
    memory_bytes: int
    pids_max: int

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def describe(self) -> dict:
        return {"cgroup": f"v{self.version}", "memory_bytes": self.memory_bytes, "pids_max": self.pids_max}

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(line) for line in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def oom_killed(self) -> bool:
        """Whether the memory cap has killed a process of the run."""
        memory = self.dirs[0]
        name, key = ("memory.events", "oom_kill") if self.version == 2 else ("memory.oom_control", "oom_kill")
        try:
            for line in (memory / name).read_text().splitlines():
                field, _, value = line.partition(" ")
                if field == key and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process still in the run's cgroup (v2: cgroup.kill) until it is empty."""
        if self.version == 2 and _write(self.dirs[0] / "cgroup.kill", "1"):
            _wait_empty(self, timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass


def _wait_empty(group: RunCgroup, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group.pids() and time.monotonic() < deadline:
        time.sleep(0.02)


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy: {'': v2 path, 'memory': v1 path, 'pids': v1 path, ...}."""
    paths: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _mounts() -> dict[str, Path]:
    """Mount points: {'': the cgroup2 mount, 'memory': v1 memory, 'pids': v1 pids} where present."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            found.setdefault("", Path(fields[4]))
        elif fstype == "cgroup":
            for controller in ("memory", "pids"):
                if controller in options:
                    found.setdefault(controller, Path(fields[4]))
    return found


def _make(parent: Path, name: str) -> Optional[Path]:
    path = parent / name
    try:
        path.mkdir()
        return path
    except OSError:
        return None


def _try_v2(mount: Path, own: str, name: str, memory_bytes: int, pids_max: int) -> Optional[RunCgroup]:
    parent = mount / own.lstrip("/")
    try:
        enabled = (parent / "cgroup.subtree_control").read_text().split()
    except OSError:
        return None
    if not {"memory", "pids"} <= set(enabled):
        return None  # enabling them here would break the no-internal-processes rule of our own cgroup
    path = _make(parent, name)
    if path is None:
        return None
    group = RunCgroup(2, [path], memory_bytes, pids_max)
    if _write(path / "memory.max", str(memory_bytes)) and _write(path / "pids.max", str(pids_max)):
        _write(path / "memory.swap.max", "0")
        return group
    group.remove()
    return None


def _try_v1(mounts: dict[str, Path], own: dict[str, str], name: str, memory_bytes: int,
            pids_max: int) -> Optional[RunCgroup]:
    if "memory" not in mounts or "pids" not in mounts:
        return None
    made: list[Path] = []
    for controller in ("memory", "pids"):
        path = _make(mounts[controller] / own.get(controller, "/").lstrip("/"), name)
        if path is None:
            RunCgroup(1, made, memory_bytes, pids_max).remove()
            return None
        made.append(path)
    group = RunCgroup(1, made, memory_bytes, pids_max)
    memory, pids = made
    if _write(memory / "memory.limit_in_bytes", str(memory_bytes)) and _write(pids / "pids.max", str(pids_max)):
        _write(memory / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no swap beyond the cap, where accounted
        return group
    group.remove()
    return None


def create_run_cgroup(memory_bytes: int, pids_max: int) -> tuple[Optional[RunCgroup], str]:
    """A fresh cgroup for one run, with its limits set; (None, why not) where this machine offers none."""
    name = f"puyu-run-{uuid.uuid4().hex[:12]}"
    mounts, own = _mounts(), _own_cgroups()
    if "" in mounts and "" in own:
        group = _try_v2(mounts[""], own[""], name, memory_bytes, pids_max)
        if group is not None:
            return group, "cgroup v2"
    group = _try_v1(mounts, own, name, memory_bytes, pids_max)
    if group is not None:
        return group, "cgroup v1"
    return None, ("no writable cgroup with the memory and pids controllers (v2 not delegated here, v1 not mounted "
                  "or not writable): per-process rlimits only")
