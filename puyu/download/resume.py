"""Resumable file transfers that survive the process.

huggingface_hub 2.x retries a broken transfer inside one call, but deletes the partial file when the call fails (and
buffers 10 MB before writing), so an interrupted download of a 4 GB shard starts again from zero. Here each file is first fetched into a partial file
of our own (`<target>.puyu-partial`) that is kept on failure and continued with an HTTP Range request on the next
call; when it is complete and its checksum matches the hub's ETag it is moved to exactly where huggingface_hub
looks for it (the cache blob, or the file in --local-dir), so the following `snapshot_download` only links it.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DownloadError

PARTIAL_SUFFIX = ".puyu-partial"
DOWNLOAD_TIMEOUT_S = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at a fixed commit, as the hub's HEAD request describes it."""

    path: str  # inside the repository
    url: str  # where the bytes are (after the hub's redirect, if any)
    etag: str  # sha256 for LFS files, the git blob id otherwise
    size: Optional[int]


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + PARTIAL_SUFFIX)


def partial_size(target: Path) -> int:
    part = partial_path(target)
    return part.stat().st_size if part.exists() else 0


def checksum_matches(path: Path, etag: str, size: Optional[int]) -> Optional[bool]:
    """Whether the file's bytes hash to `etag` (sha256 for LFS, git's blob sha1 otherwise); None if not checkable."""
    if _SHA256.fullmatch(etag):
        digest = hashlib.sha256()
    elif _GIT_SHA1.fullmatch(etag):
        digest = hashlib.sha1()
        digest.update(f"blob {path.stat().st_size}\0".encode())
    else:
        return None
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == etag


def _lock_path(part: Path) -> Path:
    folder = Path(tempfile.gettempdir()) / "puyu-download-locks"
    folder.mkdir(exist_ok=True)
    return folder / (hashlib.sha1(str(part.resolve()).encode()).hexdigest() + ".lock")


def fetch(remote: RemoteFile, target: Path, headers: Optional[dict[str, str]] = None, retries: int = 3) -> None:
    """Download `remote` to `target`, continuing a partial file left by an earlier call.

    A connection that breaks after some progress is retried (from where it broke) up to `retries` times; any other
    failure leaves the partial file for the next call. A checksum mismatch removes it and raises `DownloadError`,
    since resuming a corrupt prefix would only reproduce the corruption.
    """
    from filelock import FileLock

    part = partial_path(target)
    part.parent.mkdir(parents=True, exist_ok=True)
    # Two processes appending to one partial file would interleave their bytes. The lock lives outside the cache
    # so that the hub's cache layout stays clean.
    with FileLock(str(_lock_path(part))):
        if target.exists():  # another process finished it while we waited
            return
        _fetch_locked(remote, target, part, headers, retries)


def _fetch_locked(remote: RemoteFile, target: Path, part: Path, headers: Optional[dict[str, str]],
                  retries: int) -> None:
    if remote.size is not None and partial_size(target) > remote.size:  # not a prefix of this file: start over
        part.unlink()
    while True:
        before = partial_size(target)
        try:
            _transfer(remote, part, headers)
            break
        except Exception as exc:  # noqa: BLE001 - only broken connections with progress are retried
            if retries <= 0 or partial_size(target) <= before or not _is_broken_connection(exc):
                raise
            retries -= 1
            time.sleep(1)
    if remote.size is not None and part.stat().st_size != remote.size:
        raise DownloadError(f"{remote.path}: got {part.stat().st_size} bytes, the hub announced {remote.size}; run "
                            f"the same command again to resume")
    if checksum_matches(part, remote.etag, remote.size) is False:
        part.unlink()
        raise DownloadError(f"{remote.path}: downloaded bytes do not match the hub's checksum {remote.etag}; the "
                            f"partial file was removed, run the same command again")
    os.replace(part, target)


def _is_broken_connection(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"RemoteProtocolError", "ReadError", "ReadTimeout", "NetworkError"})


def _transfer(remote: RemoteFile, part: Path, headers: Optional[dict[str, str]]) -> None:
    """One GET (with a Range header when part of the file is here), appended to `part` as the bytes arrive."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, tqdm

    have = part.stat().st_size if part.exists() else 0
    request_headers = {**build_hf_headers(), **(headers or {})}
    if have:
        request_headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", remote.url, headers=request_headers, follow_redirects=True,
                              timeout=DOWNLOAD_TIMEOUT_S) as response:
        if have and response.status_code == 416:  # nothing left to send: the partial file is complete
            return
        hf_raise_for_status(response)
        with part.open("ab") as f:
            if have and response.status_code == 200:  # the server ignored the Range header: start over
                f.truncate(0)
                have = 0
            with tqdm(total=remote.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=remote.path[-40:]) as bar:
                for chunk in response.iter_bytes():  # as they arrive: a broken link loses nothing received
                    f.write(chunk)
                    bar.update(len(chunk))
