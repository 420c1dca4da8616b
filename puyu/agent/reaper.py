"""The sandbox's reaper: a tiny process between `Sandbox` and the worker that outlives every process of the run.

Started as `python -I -S -c <this file's text> [--cgroup-procs FILES] WORKER_ARGV...` (standard library only). It makes itself a child
subreaper, so every process the worker starts stays its descendant whatever it does (`setsid`, double fork, the
worker's own death). Invariant: when the worker exits, the reaper gets SIGTERM/SIGHUP (the parent's `close()`) or
its parent dies, every descendant is stopped, then killed and reaped before it exits.
"""
import ctypes
import os
import signal
import sys
import time


class _Stop(Exception):
    pass


def _children() -> dict:
    """ppid -> pids of every live process (zombies included: they are reaped, not signalled)."""
    tree: dict = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(name))
    return tree


def descendants(root: int) -> list:
    tree, found, todo = _children(), [], [root]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(root: int) -> None:
    """SIGSTOP every descendant until no new one appears (a stopped process cannot fork), then SIGKILL them all and
    reap what is ours."""
    stopped: set = set()
    for _ in range(10000):
        new = [pid for pid in descendants(root) if pid not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped.update(new)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def join_cgroups(argv: list) -> list:
    """`--cgroup-procs F1,F2 WORKER_ARGV...`: move this process into the run's cgroups (before anything is forked,
    so every process of the run is counted) and return WORKER_ARGV."""
    if len(argv) < 2 or argv[0] != "--cgroup-procs":
        return argv
    for procs in argv[1].split(","):
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            sys.exit(f"reaper: cannot join the run's cgroup {procs}: {exc}")
    return argv[2:]


def main() -> None:
    worker_argv = join_cgroups(sys.argv[1:])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        sys.exit("reaper: cannot become a child subreaper")
    parent = os.getppid()

    def stop(signum, frame):
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    worker = os.fork()
    if worker == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.execv(worker_argv[0], worker_argv)
        finally:
            os._exit(127)
    alive = [True]

    def interrupt(signum, frame):  # the parent's SIGINT is for the worker (never a recycled pid: we reap it)
        if alive[0]:
            try:
                os.kill(worker, signal.SIGINT)
            except OSError:
                pass

    signal.signal(signal.SIGINT, interrupt)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # the pipes' ends belong to the worker alone: EOF means the worker is gone
    os.closerange(3, 65536)
    try:
        while True:  # orphans of the run are reaped as they come; a dead parent (any thread) ends the run too
            pid = os.waitpid(-1, os.WNOHANG)[0]
            if pid == worker or (pid == 0 and os.getppid() != parent):
                break
            if pid == 0:
                time.sleep(0.2)
    except (_Stop, ChildProcessError):
        pass
    alive[0] = False
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    kill_tree(os.getpid())


if __name__ == "__main__":
    main()
