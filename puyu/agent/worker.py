"""The interpreter worker: the code that runs inside the sandboxed Python subprocess.

Started by `puyu.agent.sandbox.Sandbox` as `python -I -c <this file's text> <config json>`, so it uses the standard
library only and never imports puyu (user code cannot reach puyu internals through it). Before any user code runs it
locks itself down (resource limits, a private network namespace or Landlock/socket blocks, Landlock write limits),
then executes cells sent as JSON lines on fd 0 in one persistent namespace, like a notebook kernel. User output goes
to fd 1/2 (a pipe the parent reads and caps); one JSON result per cell goes to the control fd.
"""
import ast
import ctypes
import json
import os
import resource
import signal
import sys
import time
import traceback

_IN_CELL = False


def _on_sigint(signum, frame):
    # The parent interrupts a cell with SIGINT; outside a cell (a late signal) it is ignored.
    if _IN_CELL:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------- lock-down steps
def _set_limits(cfg):
    mem = cfg.get("memory_bytes")
    if mem:
        for name in ("RLIMIT_AS", "RLIMIT_DATA"):
            if hasattr(resource, name):
                resource.setrlimit(getattr(resource, name), (mem, mem))
    fsize = cfg.get("file_size_bytes")
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with OSError instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _unshare_network():
    """Enter a new user + network namespace: only a downed loopback device, no route anywhere."""
    uid, gid = os.getuid(), os.getgid()
    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    if _libc().unshare(clone_newuser | clone_newnet) != 0:
        return False
    try:  # keep our own uid/gid visible inside the namespace (cosmetic; access checks use the real ids)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    except OSError:
        pass
    return True


# Landlock (Linux >= 5.13): syscall numbers are shared by all architectures for these new calls.
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_TRUNCATE, _FS_REFER = 1 << 14, 1 << 13
_FS_WRITE_RIGHTS_V1 = sum(1 << i for i in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make-*
_FS_READ_RIGHTS = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE  # what a rule on a file may hold
_SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/sys",
                      "/proc/cpuinfo", "/proc/meminfo", "/proc/stat")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def read_roots():
    """What the interpreter needs to read: system directories, the Python installation and its site-packages
    (not the folders of an editable install, nor the home directory), and this process's own /proc entry."""
    roots = set(_SYSTEM_READ_ROOTS) | {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                         os.path.realpath("/proc/self")}
    roots |= {os.path.realpath(p) for p in sys.path if p and os.path.basename(p) in ("site-packages",
                                                                                     "dist-packages")}
    return sorted(r for r in roots if os.path.exists(r))


def _landlock(writable, block_tcp, restrict_reads):
    """Allow writes only beneath `writable`; with `restrict_reads`, reads and execution only beneath `read_roots()`
    and `writable`; with `block_tcp`, deny TCP connect/bind (ABI >= 4); from ABI 6 also forbid signalling
    processes and abstract unix sockets outside the sandbox. Returns the ABI version in force, or 0."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_LL_CREATE, None, 0, 1)
    if abi < 1:
        return 0
    write = _FS_WRITE_RIGHTS_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    read = _FS_READ_RIGHTS if restrict_reads else 0
    attr = _RulesetAttr(write | read, 0, 0)
    size = 8
    if abi >= 4 and block_tcp:
        attr.handled_access_net, size = 0b11, 16  # BIND_TCP | CONNECT_TCP, no rule allows any port
    if abi >= 6:
        attr.scoped, size = 0b11, 24  # LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
    fd = libc.syscall(_LL_CREATE, ctypes.byref(attr), size, 0)
    if fd < 0:
        return 0
    try:
        try:
            for path in writable:
                _landlock_rule(fd, path, write | read)
            _landlock_rule(fd, os.devnull, _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0) | read)
        except OSError:
            return 0  # without these rules the sandbox could not work: run without Landlock (and report it)
        for path in read_roots() if restrict_reads else ():
            try:
                _landlock_rule(fd, path, read)
            except OSError:  # a root we cannot open stays unreadable: fails closed
                pass
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return 0
        if libc.syscall(_LL_RESTRICT, fd, 0) != 0:
            return 0
    finally:
        os.close(fd)
    return abi


def _landlock_rule(ruleset_fd, path, access):
    if not os.path.isdir(path):
        access &= _FILE_RIGHTS
    pfd = os.open(path, os.O_PATH)
    try:
        rule = _PathBeneathAttr(access, pfd)
        if _libc().syscall(_LL_ADD_RULE, ruleset_fd, 1, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
    finally:
        os.close(pfd)


def _patch_socket():
    """Last resort when no namespace or Landlock is available: refuse to create Internet sockets from Python."""
    import socket

    class _NoNetSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
                raise PermissionError("network access is disabled in this sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = _NoNetSocket  # type: ignore[misc]
    socket.create_connection = lambda *a, **k: _NoNetSocket()


# seccomp (x86_64 only): syscall numbers and classic-BPF opcodes.
_AUDIT_ARCH_X86_64, _X32_BIT = 0xC000003E, 0x40000000
_LD_ABS, _JEQ, _JGE, _AND, _RET = 0x20, 0x15, 0x35, 0x54, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_SYS_SOCKET, _SYS_SOCKETPAIR, _SYS_CLONE3 = 41, 53, 435
_AF_UNIX, _AF_INET, _AF_INET6, _SOCK_STREAM = 1, 2, 10, 1
# chmod/chown/utime/xattr (Landlock does not cover metadata), io_uring (would bypass this filter), ptrace and
# friends, file handles, bpf, mounts, keyrings, modules, perf, userfaultfd, setns.
_DENIED = (90, 91, 268, 452, 92, 93, 94, 260, 132, 235, 261, 280, 188, 189, 190, 197, 198, 199, 463, 466,
           425, 426, 427, 101, 310, 311, 438, 303, 304, 321, 165, 166, 155, 428, 429, 430, 431, 432, 433,
           248, 249, 250, 175, 176, 313, 246, 320, 298, 323, 308)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_SIGNAL_CALLS = (62, 200, 234, 129, 297, 434, 302)  # kill, tkill, tgkill, rt_(tg)sigqueueinfo, pidfd_open, prlimit64


def seccomp_program(allow_inet, reaper=0):
    """The filter, as (code, jt, jf, k) tuples. Invariant: every path ends in a return; a foreign arch or an x32
    call is EPERM; socket() is EPERM except AF_INET/AF_INET6 when `allow_inet` (never AF_UNIX: a pathname socket
    outside the run folder is not covered by Landlock or the network namespace); socketpair() only as
    AF_UNIX/SOCK_STREAM (a datagram pair could sendto() any socket path); clone3 is ENOSYS (libc falls back to
    clone); the `_DENIED` calls are EPERM; the `_SIGNAL_CALLS` cannot target the pid `reaper` (nor, for kill(),
    its group, our group or -1: every process); everything else is allowed."""
    deny = (_RET, 0, 0, _ERRNO | 1)
    prog = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, _AUDIT_ARCH_X86_64), deny,
            (_LD_ABS, 0, 0, 0), (_JGE, 0, 1, _X32_BIT), deny,
            (_JEQ, 0, 1, _SYS_CLONE3), (_RET, 0, 0, _ERRNO | 38)]
    for nr in _DENIED:
        prog += [(_JEQ, 0, 1, nr), deny]
    if reaper:
        targets = (reaper, -reaper & 0xFFFFFFFF, 0, 0xFFFFFFFF)
        kill = [(_LD_ABS, 0, 0, 16)] + [(_JEQ, len(targets) - i, 0, t) for i, t in enumerate(targets)]
        prog += [(_JEQ, 0, len(kill) + 2, 62)] + kill + [(_RET, 0, 0, _ALLOW), deny]
        for nr in _SIGNAL_CALLS[1:]:
            prog += [(_JEQ, 0, 4, nr), (_LD_ABS, 0, 0, 16), (_JEQ, 1, 0, reaper), (_RET, 0, 0, _ALLOW), deny]
    families = (_AF_INET, _AF_INET6) if allow_inet else ()
    block = [(_LD_ABS, 0, 0, 16)] + [(_JEQ, len(families) - i, 0, f) for i, f in enumerate(families)]
    prog += [(_JEQ, 0, len(block) + 2, _SYS_SOCKET)] + block + [deny, (_RET, 0, 0, _ALLOW)]
    prog += [(_JEQ, 0, 6, _SYS_SOCKETPAIR), (_LD_ABS, 0, 0, 16), (_JEQ, 0, 3, _AF_UNIX), (_LD_ABS, 0, 0, 24),
             (_AND, 0, 0, 0xF), (_JEQ, 1, 0, _SOCK_STREAM), deny]
    return prog + [(_RET, 0, 0, _ALLOW)]


def _seccomp(allow_inet, reaper):
    """Install `seccomp_program` for this process and its future children; False where it cannot be (not x86_64,
    no seccomp). Needs no_new_privs, which it sets."""
    if os.uname().machine != "x86_64":
        return False
    libc = _libc()
    prog = seccomp_program(allow_inet, reaper)
    insns = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), insns)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def lock_down(cfg):
    """Apply every restriction and report which ones are in force.

    Network, strongest first: a private network namespace (no interface but a downed loopback); else Landlock TCP
    rules (connect/bind denied, kernel ABI >= 4; UDP and raw sockets stay open); plus, whenever there is no
    namespace, a patched `socket.socket` (only stops Python code that goes through the `socket` module). Last, the
    seccomp filter (`seccomp_program`): no socket() but AF_INET/AF_INET6 (and those only with the network on),
    no chmod/chown/utime/xattr calls."""
    _set_limits(cfg)
    block = cfg.get("block_network", True)
    network = []
    if block and cfg.get("use_namespaces", True) and _unshare_network():
        network.append("namespace")
    reads = cfg.get("restrict_reads", True)
    abi = _landlock(cfg["writable"], block and not network, reads) if cfg.get("use_landlock", True) else 0
    if block and not network:
        if abi >= 4:
            network.append("landlock-tcp")
        _patch_socket()
        network.append("socket-patch")
    reaper = os.getppid() if cfg.get("reaper") else 0
    seccomp = bool(cfg.get("use_seccomp", True)) and _seccomp(not block, reaper)
    if seccomp:
        _tolerate_metadata_errors()
        network.append("seccomp")
    return {"memory_bytes": cfg.get("memory_bytes"), "network": "+".join(network) or "open", "seccomp": seccomp,
            "filesystem": (f"landlock-v{abi}:" + ("read+write" if reads else "write")) if abi else "unrestricted"}


def _tolerate_metadata_errors():
    """`shutil.copy`/`copy2` copy permission bits and times, which the seccomp filter refuses: keep the copy."""
    import shutil

    def tolerant(original):
        def call(*args, **kwargs):
            try:
                original(*args, **kwargs)
            except PermissionError:
                pass
        return call

    shutil.copymode, shutil.copystat = tolerant(shutil.copymode), tolerant(shutil.copystat)


# ---------------------------------------------------------------------------------------------- figures
class _FigureSaver:
    """Saves every open matplotlib figure as PNG (after each cell and on `plt.show()`), then closes it."""

    def __init__(self, directory):
        self.directory = directory
        self.cell = 0
        self.saved = []
        self.count = 0

    def save_open_figures(self):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            self.count += 1
            path = os.path.join(self.directory, f"figure-{self.cell:03d}-{self.count:02d}.png")
            try:
                fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
                self.saved.append(path)
            except Exception as exc:  # a broken figure must not break the cell result
                print(f"[sandbox] could not save figure {num}: {exc}", file=sys.stderr)
            plt.close(fig)

    def install_show_hook(self):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and not getattr(plt.show, "_puyu_hook", False):
            def show(*args, **kwargs):
                self.save_open_figures()
            setattr(show, "_puyu_hook", True)  # noqa: B010 (a marker on a function object)
            setattr(plt, "show", show)  # noqa: B010


# ---------------------------------------------------------------------------------------------- cells
def _compile_cell(code):
    """Compile like a notebook cell: a trailing expression's value is printed (as `repr`)."""
    tree = ast.parse(code, "<cell>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    body = compile(tree, "<cell>", "exec")
    return body, (compile(last, "<cell>", "eval") if last is not None else None)


def _user_traceback(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        tb = None
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _flush_then(write):
    """Keep printed output and the error in order (stdout is block-buffered on a pipe)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError, KeyboardInterrupt):
        pass
    write()


def run_cell(code, namespace, figures):
    global _IN_CELL
    error = None
    _IN_CELL = True
    try:
        body, last = _compile_cell(code)
        exec(body, namespace)
        figures.install_show_hook()
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                namespace["_"] = value
                print(repr(value))
    except KeyboardInterrupt:
        error = "KeyboardInterrupt: the cell was interrupted"
        _flush_then(lambda: print(error, file=sys.stderr))
    except BaseException as exc:  # SystemExit included: user code must not end the worker
        error = f"{type(exc).__name__}: {exc}"
        trace = _user_traceback(exc)
        _flush_then(lambda: sys.stderr.write(trace))
    finally:
        _IN_CELL = False
    return error


def main():
    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, _on_sigint)
    commands = os.fdopen(os.dup(0), "r", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # user code reads an empty stdin
    control = os.fdopen(cfg["control_fd"], "w", encoding="utf-8")
    os.chdir(cfg["workdir"])
    report = lock_down(cfg)
    figures = _FigureSaver(cfg["figures_dir"])
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    control.write(json.dumps({"ready": True, "isolation": report}) + "\n")
    control.flush()
    for line in commands:
        request = json.loads(line)
        figures.cell, figures.saved = request["cell"], []
        start = time.monotonic()
        error = run_cell(request["code"], namespace, figures)
        figures.save_open_figures()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # user code closed or replaced it
                pass
        result = {"cell": request["cell"], "error": error, "figures": figures.saved,
                  "duration_s": round(time.monotonic() - start, 4)}
        control.write(json.dumps(result) + "\n")
        control.flush()


if __name__ == "__main__":
    main()
