"""A real OpenAI-style streaming server on 127.0.0.1 that closes reused keep-alive connections the way llama-server
does under load: the first request on a connection gets a complete streamed completion (with `Connection:
keep-alive`), a later request on the same connection sees the socket closed before any byte of a response
("Server disconnected without sending a response" in httpx)."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from puyu.testing import free_port

WORDS = ["one", " two", " three", " four"]


def _chunk(data: bytes) -> bytes:
    """One chunk of a chunked transfer encoding."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _sse(obj: Any) -> bytes:
    return _chunk(f"data: {json.dumps(obj)}\n\n".encode())


async def _read_request(reader: asyncio.StreamReader) -> str:
    """Read one HTTP request (headers + Content-Length body); its path."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return head.decode("latin-1").split(" ")[1]


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict) -> None:
    served = 0
    try:
        while True:
            path = await _read_request(reader)
            if not path.startswith("/v1/"):  # no /tokenize here (as llama-server or transformers serve)
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if served:  # a reused connection: drop it without answering
                stats["dropped"] += 1
                return
            served += 1
            stats["served"] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: keep-alive\r\n\r\n")
            for w in WORDS:
                writer.write(_sse({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}))
            writer.write(_sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
            writer.write(_sse({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": len(WORDS),
                                                        "total_tokens": 8 + len(WORDS)}}))
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


class KeepAliveClosingServer:
    """The server in a daemon thread (a context manager); `stats` counts served and dropped requests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stats = {"served": 0, "dropped": 0}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()

        async def main() -> None:
            self.server = await asyncio.start_server(lambda r, w: _handle(r, w, self.stats), "127.0.0.1", self.port)
            self._ready.set()
            async with self.server:
                await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def __enter__(self) -> "KeepAliveClosingServer":
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self._thread.join(timeout=10)
