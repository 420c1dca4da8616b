"""The sandboxed interpreter: real worker processes, real limits, real sockets."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from puyu.agent.sandbox import Sandbox, SandboxConfig, SandboxError, copy_input_files

# Cells get a generous limit (a loaded CI machine must not fail them); the timeout tests pass a short one per cell.
FAST = SandboxConfig(timeout_s=120, interrupt_grace_s=10, memory_mb=768, output_limit_bytes=4000)
SHORT = 1.0


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One sandbox for the tests that only need a working interpreter (saves start-up time)."""
    root = tmp_path_factory.mktemp("shared-sandbox")
    with Sandbox(root / "work", root / "figures", FAST) as sb:
        yield sb


def test_state_persists_across_cells_and_last_expression_is_shown(shared):
    assert shared.run("x = 20\ny = x + 1").status == "ok"
    r = shared.run("y * 2")
    assert r.status == "ok" and r.output.strip() == "42"


def test_error_is_reported_with_traceback_in_order(shared):
    r = shared.run("print('before')\n1/0")
    assert r.status == "error" and r.error.startswith("ZeroDivisionError")
    assert r.output.index("before") < r.output.index("ZeroDivisionError")
    assert "worker.py" not in r.output  # the traceback shows the cell, not the sandbox machinery


def test_busy_loop_is_interrupted_and_variables_survive(shared):
    shared.run("kept = 'still here'")
    r = shared.run("while True:\n    pass", timeout_s=SHORT)
    assert r.status == "timeout" and not r.restarted
    assert shared.run("kept").output.strip() == "'still here'"


def test_endless_printing_is_stopped_by_the_output_cap(shared):
    r = shared.run("while True:\n    print('spam' * 10)")
    assert r.status == "output_limit"
    assert r.truncated and r.output_bytes > FAST.output_limit_bytes
    assert len(r.output.encode()) < FAST.output_limit_bytes + 200  # the cap plus the truncation note


def test_slow_endless_printing_is_stopped_by_the_timeout(shared):
    r = shared.run("import time\nwhile True:\n    print('tick', flush=True); time.sleep(0.1)", timeout_s=3)
    assert r.status == "timeout" and "tick" in r.output


def test_cell_that_ignores_interrupts_is_killed_and_the_worker_replaced(tmp_path):
    with Sandbox(tmp_path / "w", config=SandboxConfig(timeout_s=120, interrupt_grace_s=1.0)) as sb:
        sb.run("lost = 1")
        pid_before = sb._proc.pid
        r = sb.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", timeout_s=3)
        assert r.status == "timeout" and r.restarted and "variables were lost" in r.error
        with pytest.raises(ProcessLookupError):
            os.kill(pid_before, 0)  # the old worker is really gone (reaped)
        assert sb.run("lost").error.startswith("NameError")


def test_worker_exit_is_reported_as_crash_and_next_cell_works(tmp_path):
    with Sandbox(tmp_path / "w", config=FAST) as sb:
        r = sb.run("import os\nos._exit(3)")
        assert r.status == "crashed" and r.restarted
        assert sb.run("1 + 1").output.strip() == "2"


def test_memory_cap_holds(shared):
    r = shared.run("big = bytearray(2 * 1024 ** 3)")
    assert r.status == "error" and r.error.startswith("MemoryError")
    assert shared.run("'alive'").output.strip() == "'alive'"


@pytest.fixture()
def tcp_server():
    """A real listening socket on 127.0.0.1 that the test process itself can reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    accepted = []
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(conn)
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join()
    srv.close()


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('CONNECTED')"


def test_network_connection_fails(shared, tcp_server):
    port, accepted = tcp_server
    socket.create_connection(("127.0.0.1", port), timeout=3).close()  # the server is reachable from outside
    r = shared.run(CONNECT.format(port=port))
    assert r.status == "error" and "CONNECTED" not in r.output
    assert shared.isolation["network"] != "open"


def test_socket_patch_fallback_blocks_connections(tmp_path, tcp_server):
    port, _ = tcp_server
    cfg = SandboxConfig(timeout_s=120, use_namespaces=False, use_landlock=False, use_seccomp=False)
    with Sandbox(tmp_path / "w", config=cfg) as sb:
        assert sb.isolation["network"] == "socket-patch" and sb.isolation["filesystem"] == "unrestricted"
        r = sb.run(CONNECT.format(port=port))
        assert r.error.startswith("PermissionError") and "CONNECTED" not in r.output


def test_input_files_are_copies_and_outside_files_untouched(tmp_path):
    original = tmp_path / "data.csv"
    original.write_text("a,b\n1,2\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    copy_input_files([original], work)
    with Sandbox(work, config=FAST) as sb:
        r = sb.run("open('data.csv', 'a').write('3,4\\n')\nprint(open('data.csv').read())")
        assert r.status == "ok" and "3,4" in r.output
        attempt = sb.run(f"open({str(outside / 'escape.txt')!r}, 'w').write('x')")
        relative = sb.run("open('../escape.txt', 'w').write('x')")
        landlock = sb.isolation["filesystem"].startswith("landlock")
    assert original.read_text() == "a,b\n1,2\n"
    if not landlock:
        pytest.skip("Landlock is not available here: writes outside the run folder are not blocked")
    assert attempt.error.startswith("PermissionError") and relative.error.startswith("PermissionError")
    assert list(outside.iterdir()) == [] and not (tmp_path / "run" / "escape.txt").exists()


def test_two_runs_do_not_share_state(tmp_path):
    with Sandbox(tmp_path / "a", config=FAST) as a, Sandbox(tmp_path / "b", config=FAST) as b:
        a.run("secret = 123\nimport json\njson.shared_marker = 1\nopen('note.txt', 'w').write('a')")
        assert b.run("secret").error.startswith("NameError")
        assert b.run("import json\nhasattr(json, 'shared_marker')").output.strip() == "False"
        assert b.run("import os\nos.path.exists('note.txt')").output.strip() == "False"
        assert a._proc.pid != b._proc.pid


def test_parent_environment_does_not_reach_user_code(shared, monkeypatch):
    monkeypatch.setenv("PUYU_TEST_SECRET", "s3cr3t")
    with Sandbox(Path(shared.workdir).parent / "env-check", config=FAST) as sb:
        r = sb.run("import os\nsorted(os.environ)")
    assert "PUYU_TEST_SECRET" not in r.output and "MPLBACKEND" in r.output


def test_plot_comes_back_as_png(shared):
    r = shared.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()\n"
                   "plt.figure()\nplt.bar(['a', 'b'], [1, 2])")
    assert r.status == "ok" and len(r.figures) == 2
    for path in r.figures:
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert Path(path).parent == shared.figures_dir


def test_missing_input_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        copy_input_files([tmp_path / "nope.csv"], tmp_path)


def test_bad_config_names_the_field(shared):
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        shared.run("1", timeout_s=-1)


def test_forged_results_on_the_control_pipe_are_ignored(shared):
    """User code can write to the worker's control pipe; lines that are not this cell's result are dropped and
    claimed figures outside the figures folder are not returned. (A forged line with the right cell number ends the
    wait early; its late output then shows up in the next cell: only the forger is fooled.)"""
    forge = ("import json, os\nfd = [int(f) for f in os.listdir('/proc/self/fd') if f.isdigit() and f not in "
             "('0', '1', '2')]\nfor f in fd:\n    try:\n        os.write(f, (json.dumps({'cell': -1, 'error': None}) "
             "+ '\\n').encode())\n    except OSError:\n        pass\nprint('forged')")
    r = shared.run(forge)
    assert r.status == "ok" and "forged" in r.output
    cell = shared._cells + 1
    claim = ("import json, os\nfor f in [int(f) for f in os.listdir('/proc/self/fd') if f.isdigit()][3:]:\n    try:\n"
             f"        os.write(f, (json.dumps({{'cell': {cell}, 'error': None, 'figures': ['/etc/passwd']}}) "
             "+ '\\n').encode())\n    except OSError:\n        pass\nimport time; time.sleep(0.5)\n'done'")
    r = shared.run(claim)
    assert r.figures == []
    after = shared.run("40 + 2")  # the stale real result of the previous cell did not become this cell's reply
    assert after.status == "ok" and after.output.strip().splitlines()[-1] == "42"


def test_landlock_tcp_rules_block_raw_sockets_without_a_namespace(tmp_path, tcp_server):
    """Without a network namespace, Landlock (ABI >= 4) denies TCP connect even to code that bypasses the patched
    `socket` module through `_socket`."""
    port, accepted = tcp_server
    with Sandbox(tmp_path / "w", config=SandboxConfig(timeout_s=120, use_namespaces=False, use_seccomp=False)) as sb:
        if "landlock-tcp" not in sb.isolation["network"]:
            pytest.skip(f"Landlock TCP rules are not available here ({sb.isolation})")
        r = sb.run(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('CONNECTED')")
    assert r.error.startswith("PermissionError") and "CONNECTED" not in r.output and not accepted


def test_reads_outside_system_paths_and_the_run_folder_are_denied(tmp_path, monkeypatch):
    """A secret next to the run folder and the parent's environment (/proc/PID/environ) stay unreadable, while
    system files and the Python installation remain readable."""
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    monkeypatch.setenv("PUYU_TEST_SECRET", "s3cr3t")
    with Sandbox(tmp_path / "run" / "work", config=FAST) as sb:
        if not sb.isolation["filesystem"].endswith(":read+write"):
            pytest.skip(f"Landlock read rules are not available here ({sb.isolation})")
        theirs = sb.run(f"open({str(secret)!r}).read()")
        environ = sb.run(f"open('/proc/{os.getpid()}/environ', 'rb').read()")
        ours = sb.run("import json, os\nos.listdir('/usr') != [] and len(open(json.__file__).read()) > 100")
    assert theirs.error.startswith("PermissionError") and "token" not in theirs.output
    assert environ.error.startswith("PermissionError") and "s3cr3t" not in environ.output
    assert ours.status == "ok" and ours.output.strip() == "True"


def test_closing_stdout_and_a_closed_sandbox(tmp_path):
    sb = Sandbox(tmp_path / "w", config=FAST)
    r = sb.run("import os\nprint('bye')\nos.close(1)\nos.close(2)\nx = 5")
    assert r.status == "ok" and not r.restarted
    r = sb.run("y = x + 1")  # no output any more, but the interpreter and its state still work
    assert r.status == "ok" and not r.restarted
    sb.close()
    with pytest.raises(SandboxError, match="closed"):
        sb.run("1")
