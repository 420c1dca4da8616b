"""Hostile code against the real sandbox: unix sockets by path, metadata changes outside the run folder, other socket
families without a namespace, processes that leave the process group, a flooded control pipe."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from puyu.agent.sandbox import Sandbox, SandboxConfig, copy_input_files

CFG = SandboxConfig(timeout_s=120, interrupt_grace_s=2, memory_mb=768, output_limit_bytes=4000)


@pytest.fixture()
def outside():
    """A short folder outside the run folder (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="puyu-out-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unix_sockets_outside_cannot_be_reached(tmp_path, outside):
    stream, dgram = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stream.bind(str(outside / "s.sock"))
    stream.listen()
    dgram.bind(str(outside / "d.sock"))
    stream.settimeout(0.5)
    dgram.settimeout(0.5)
    code = ("import _socket\ntry:\n    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
            f"    s.connect({str(outside / 's.sock')!r}); print('CONNECTED')\nexcept OSError as e: print('no', e)\n"
            "a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM)\n"
            f"a.sendto(b'x', {str(outside / 'd.sock')!r}); print('SENT')")
    with Sandbox(tmp_path / "w", config=CFG) as sb:
        r = sb.run(code)
        fine = sb.run("import asyncio, multiprocessing\nasyncio.run(asyncio.sleep(0))\n"
                      "a, b = multiprocessing.Pipe()\na.send(1)\nb.recv()")
        seccomp = sb.isolation.get("seccomp")
    assert "CONNECTED" not in r.output and "SENT" not in r.output and r.error.startswith("PermissionError")
    with pytest.raises(socket.timeout):
        stream.accept()
    with pytest.raises(socket.timeout):
        dgram.recv(10)
    assert fine.status == "ok" and fine.output.strip() == "1"  # socketpair(AF_UNIX, SOCK_STREAM) still works
    assert seccomp is True
    stream.close()
    dgram.close()


def test_metadata_changes_outside_the_run_folder_are_denied(tmp_path, outside):
    target = outside / "victim.txt"
    target.write_text("x")
    target.chmod(0o644)
    before = target.stat()
    attempts = [f"os.chmod({str(target)!r}, 0o4777)", f"os.utime({str(target)!r}, (0, 0))",
                f"os.setxattr({str(target)!r}, 'user.x', b'1')", f"os.chown({str(target)!r}, 1, 1)",
                f"fd = os.open({str(target)!r}, os.O_RDONLY); os.fchmod(fd, 0o6777)"]
    with Sandbox(tmp_path / "w", config=CFG) as sb:
        results = [sb.run("import os\n" + a) for a in attempts]
        inside = sb.run("import shutil, sqlite3, pathlib\nopen('a.txt', 'w').write('1')\nshutil.copy('a.txt', 'b.txt')"
                        "\nshutil.copy2('a.txt', 'c.txt')\npathlib.Path('a.txt').touch()\n"
                        "c = sqlite3.connect('db.sqlite'); c.execute('create table t(x)'); c.commit()\n"
                        "open('c.txt').read()")
    for a, r in zip(attempts, results):
        assert r.status == "error" and r.error.startswith("PermissionError"), (a, r)
    after = target.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_uid) == (before.st_mode, before.st_mtime_ns, before.st_uid)
    assert os.listxattr(target) == []
    assert inside.status == "ok" and inside.output.strip() == "'1'", inside


def test_no_namespace_fallback_denies_other_socket_families(tmp_path):
    families = ["_socket.AF_NETLINK, _socket.SOCK_RAW, 0", "_socket.AF_PACKET, _socket.SOCK_RAW, 0",
                "_socket.AF_INET, _socket.SOCK_RAW, 1", "_socket.AF_INET, _socket.SOCK_STREAM, 262",
                "_socket.AF_INET, _socket.SOCK_DGRAM, 0", "_socket.AF_INET6, _socket.SOCK_STREAM, 0",
                "_socket.AF_UNIX, _socket.SOCK_STREAM, 0"]
    uring = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n(libc.syscall(425, 1, 0), ctypes.get_errno())"
    with Sandbox(tmp_path / "w", config=SandboxConfig(timeout_s=120, use_namespaces=False)) as sb:
        results = [sb.run(f"import _socket\n_socket.socket({f})") for f in families]
        ring = sb.run(uring)
        assert "seccomp" in sb.isolation["network"]
    for f, r in zip(families, results):
        assert r.status == "error" and r.error.startswith("PermissionError"), (f, r)
    assert ring.output.strip() == "(-1, 1)"  # io_uring (which would bypass the socket filter) is EPERM


ESCAPEE = ("import os, subprocess, sys\n"
           "src = {src!r}\n"
           "p = subprocess.Popen([sys.executable, '-c', src], start_new_session=True); p.wait()\n"
           "print('spawned')")
GRANDCHILD = "import os, time\nif os.fork(): os._exit(0)\nos.setsid()\ntime.sleep({delay})\nopen({mark!r}, 'w')"


def escapee(delay: float, mark: Path) -> str:
    return ESCAPEE.format(src=GRANDCHILD.format(delay=delay, mark=str(mark)))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _sandboxed_pids(tmp_path: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(tmp_path) in (p / "cwd").resolve().as_posix() and int(p.name) != os.getpid():
                pids.append(int(p.name))
        except OSError:
            pass
    return [p for p in pids if _alive(p)]


def test_processes_that_leave_the_group_die_with_the_run(tmp_path):
    """A double-forked, setsid'd grandchild outlives neither `close()` nor a worker killed after a timeout."""
    work = tmp_path / "w"
    sb = Sandbox(work, config=SandboxConfig(timeout_s=120, interrupt_grace_s=1))
    r = sb.run(escapee(5, work / "timeout.txt") +
               "\nimport signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass", timeout_s=2)
    assert r.status == "timeout" and r.restarted
    r = sb.run(escapee(5, work / "crash.txt") + "\nos._exit(1)")
    assert r.status == "crashed"
    assert sb.run(escapee(5, work / "closed.txt")).output.strip() == "spawned"
    sb.close()
    assert _sandboxed_pids(tmp_path) == []
    time.sleep(6)
    assert sorted(p.name for p in work.iterdir()) == []


def test_the_reaper_cannot_be_signalled_without_landlock(tmp_path):
    """Without Landlock's signal scope the seccomp filter keeps user code from killing the reaper (and from kill(-1)):
    the run's processes still die with it."""
    work = tmp_path / "w"
    sb = Sandbox(work, config=SandboxConfig(timeout_s=120, use_landlock=False))
    r = sb.run(escapee(5, work / "mark.txt") + "\nfor pid, sig in ((-os.getppid(), 0), (0, 0), (-1, 0), (os.getppid(), 9)):"
               "  # signal 0 only probes\n    try:\n        os.kill(pid, sig)\n    except PermissionError:\n"
               "        print('denied', pid)")
    assert r.output.count("denied") == 4, r
    sb.close()
    assert _sandboxed_pids(tmp_path) == []
    time.sleep(6)
    assert not (work / "mark.txt").exists()


def test_a_flooded_control_pipe_stops_the_cell(tmp_path):
    """Garbage without a newline on the control pipe does not pile up in the parent: the worker is replaced."""
    flood = ("import os\nfor f in [int(f) for f in os.listdir('/proc/self/fd') if f.isdigit()][3:]:\n    try:\n"
             "        os.write(f, b'x' * (8 << 20))\n    except OSError:\n        pass\nimport time; time.sleep(30)")
    with Sandbox(tmp_path / "w", config=CFG) as sb:
        r = sb.run(flood, timeout_s=20)
        assert r.status == "crashed" and r.restarted and "control" in r.error
        assert sb.run("1 + 1").output.strip() == "2"


def test_input_symlinks_and_special_files_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    link = tmp_path / "data.csv"
    link.symlink_to(secret)
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(ValueError, match="symlink"):
        copy_input_files([link], work)
    with pytest.raises(ValueError, match="regular"):
        copy_input_files(["/dev/zero"], work)
    (work / "plain.csv").symlink_to(secret)  # a planted link at the destination is not followed
    plain = tmp_path / "plain.csv"
    plain.write_text("a\n")
    with pytest.raises(OSError):
        copy_input_files([plain], work)
    assert secret.read_text() == "token"


def test_figure_symlinks_are_not_returned(tmp_path):
    """A forged result may claim a symlink in the figures folder; the parent does not follow it."""
    with Sandbox(tmp_path / "w", tmp_path / "f", config=CFG) as sb:
        link = tmp_path / "f" / "figure-001-01.png"
        cell = sb._cells + 1
        r = sb.run(f"import json, os\nos.symlink('/etc/passwd', {str(link)!r})\n"
                   "for f in [int(f) for f in os.listdir('/proc/self/fd') if f.isdigit()][3:]:\n    try:\n"
                   f"        os.write(f, (json.dumps({{'cell': {cell}, 'error': None, 'figures': [{str(link)!r}]}})"
                   " + '\\n').encode())\n    except OSError:\n        pass\nimport time; time.sleep(0.5)")
    assert link.is_symlink() and r.figures == []


def _cgroup_or_skip(sb: Sandbox) -> dict:
    limits = sb.start()["run_limits"]
    if limits["cgroup"] is None:
        sb.close()
        pytest.skip(f"no per-run cgroup on this machine: {limits['reason']}")
    return limits


def test_memory_cap_counts_the_whole_run(tmp_path):
    """A memfd (not address space: RLIMIT_AS does not see it) and two children each under the per-process cap
    together exceed the run's cap: the run's cgroup kills it and the cell says why."""
    sb = Sandbox(tmp_path / "w", config=SandboxConfig(timeout_s=120, memory_mb=256))
    assert _cgroup_or_skip(sb)["memory_bytes"] == 256 * 2**20
    r = sb.run("import os\nfd = os.memfd_create('x')\nchunk = b'a' * 2**20\n"
               "for _ in range(1024):\n    os.write(fd, chunk)\nprint('wrote 1 GiB')")
    assert r.status == "memory_limit" and "wrote 1 GiB" not in r.output and "256 MiB" in r.error
    r = sb.run("import subprocess, sys\n"
               "kids = [subprocess.Popen([sys.executable, '-c', 'b = bytearray(150 * 2**20); import time; "
               "time.sleep(30)']) for _ in range(3)]\n"
               "[k.wait() for k in kids]\nprint('codes', [k.returncode for k in kids])")
    assert r.status == "ok" and "-9" in r.output, r.output  # a child over the shared cap is killed, the run goes on
    sb.close()


def test_process_cap_counts_the_whole_run(tmp_path):
    sb = Sandbox(tmp_path / "w", config=SandboxConfig(timeout_s=120, max_processes=24))
    assert _cgroup_or_skip(sb)["pids_max"] == 24
    r = sb.run("import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
               "            time.sleep(20)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
               "    print('refused after', n, type(e).__name__)")
    assert r.status == "ok" and "refused after" in r.output and "BlockingIOError" in r.output, r.output
    assert int(r.output.split()[2]) < 24
    groups = [Path(f).parent for f in sb._cgroup.procs_files]
    sb.close()
    assert not any(g.exists() for g in groups)  # the run's cgroups are removed with it
