"""Checking that the address a server will listen on is free, before the model is loaded.

Loading a model takes seconds; a busy port found only when uvicorn (or Gradio) binds it wastes them and ends in a
traceback. `check_bindable` binds the address the way those servers do (SO_REUSEADDR, so a port left in TIME_WAIT
by a server that just stopped counts as free) and closes it at once. Between the check and the real bind another
process may take the port; the server then still fails, as before, but that race is rare and the check is cheap.
"""
from __future__ import annotations

import errno
import socket


def check_bindable(host: str, port: int, host_flag: str = "--server-name", port_flag: str = "--server-port") -> None:
    """ValueError (one line, naming the flag) if `host:port` cannot be bound now; nothing otherwise."""
    if not 0 < port < 65536:
        raise ValueError(f"{port_flag}: {port} is not a TCP port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"{host_flag}: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"{port_flag}: {host}:{port} is already in use (another server is listening "
                                 f"there); stop it or choose another port with {port_flag}") from None
            if exc.errno == errno.EACCES:
                raise ValueError(f"{port_flag}: no permission to listen on port {port} (ports below 1024 need "
                                 f"root); choose another with {port_flag}") from None
            raise ValueError(f"{host_flag}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
