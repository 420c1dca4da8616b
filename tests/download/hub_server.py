"""A hub-compatible server for the download tests: olah serving local git repositories offline, behind a link that
can break.

olah (a Hugging Face mirror) answers the hub API (/api/models/{repo}/revision/{rev}, HEAD/GET /{repo}/resolve/...)
from git repositories under `<mirrors>/models/<owner>/<name>` (LFS objects read from .git/lfs). Two things the
tests need are added in front of it as ASGI middleware:
- HTTP Range requests (olah streams local-mirror files whole), so a client can resume;
- faults on command: cut the connection after N bytes of a file, or answer 503 for the next K requests of a file.
Control endpoints: POST /_test/faults {"file", "drop_after", "fail_next"}, GET /_test/log, POST /_test/reset.

Run: python hub_server.py --mirrors DIR --port PORT --workdir DIR
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


class ConnectionCut(Exception):
    """Raised mid-response: uvicorn then closes the socket with the body incomplete."""


class FaultyLink:
    def __init__(self, app) -> None:
        self.app = app
        self.faults: dict[str, dict] = {}
        self.log: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/_test/"):
            return await self._control(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.log.append({"method": scope["method"], "path": scope["path"], "range": headers.get("range")})
        if scope["method"] == "GET" and "/resolve/" in scope["path"]:
            return await self._file(scope, receive, send, headers.get("range"))
        return await self.app(scope, receive, send)

    async def _control(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/_test/faults":
            fault = json.loads(body)
            self.faults[fault["file"]] = {"drop_after": fault.get("drop_after"), "fail_next": fault.get("fail_next", 0)}
        elif scope["path"] == "/_test/reset":
            self.faults.clear()
            self.log.clear()
        await _send(send, 200, {"content-type": "application/json"}, json.dumps(self.log).encode())

    async def _file(self, scope, receive, send, range_header) -> None:
        status, headers, body = await _collect(self.app, scope, receive)
        name = scope["path"].rsplit("/", 1)[-1]
        fault = self.faults.get(name, {})
        if status != 200:
            return await _send(send, status, headers, body)
        if fault.get("fail_next") and fault.get("drop_after") is None:  # the cut comes first, then the outage
            fault["fail_next"] -= 1
            return await _send(send, 503, {"content-type": "text/plain"}, b"link down")
        headers = {k: v for k, v in headers.items() if k not in ("content-length", "transfer-encoding")}
        headers["accept-ranges"] = "bytes"
        total = len(body)
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            start = int(match.group(1))
            end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            if start >= total:
                return await _send(send, 416, {"content-range": f"bytes */{total}"}, b"")
            body, status = body[start:end + 1], 206
            headers["content-range"] = f"bytes {start}-{end}/{total}"
        drop_after = fault.get("drop_after")
        if drop_after is None:
            return await _send(send, status, headers, body)
        fault["drop_after"] = None  # one cut per request for a fault
        await send({"type": "http.response.start", "status": status,
                    "headers": _encode({**headers, "content-length": str(len(body))})})
        await send({"type": "http.response.body", "body": body[:drop_after], "more_body": True})
        raise ConnectionCut(f"{name}: cut after {drop_after} bytes")


async def _collect(app, scope, receive):
    result = {"status": 500, "headers": {}, "body": b""}

    async def capture(message) -> None:
        if message["type"] == "http.response.start":
            result["status"] = message["status"]
            result["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            result["body"] += message.get("body", b"")

    await app(scope, receive, capture)
    return result["status"], result["headers"], result["body"]


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def _send(send, status: int, headers: dict[str, str], body: bytes) -> None:
    headers = {k: v for k, v in headers.items() if k not in ("content-length", "transfer-encoding")}
    headers["content-length"] = str(len(body))
    await send({"type": "http.response.start", "status": status, "headers": _encode(headers)})
    await send({"type": "http.response.body", "body": body})


def build_app(mirrors: Path, workdir: Path, port: int):
    config_path = workdir / "olah.toml"
    config_path.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        "[accessibility]\noffline = true\n")
    from olah import server as olah_server
    from olah.configs import OlahConfig

    olah_server.app.state.app_settings = olah_server.AppSettings(config=OlahConfig(str(config_path)))
    return FaultyLink(olah_server.app)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirrors", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(build_app(args.mirrors, args.workdir, args.port), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
