"""Download errors, each a `ValueError` whose message is one line a user can act on.

`explain(exc, ...)` turns what huggingface_hub, httpx and the OS raise into one of these, so the CLI prints
`puyu: error: <message>` (exit 2) instead of a traceback.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

from .registry import RegistryError, UnknownModelError

MIRROR_HINT = ("set a mirror with `export HF_ENDPOINT=https://hf-mirror.com` or `--endpoint URL`")

__all__ = ["DownloadError", "RepoNotFoundError", "HubUnreachableError", "DiskFullError", "DownloadInterruptedError",
           "MissingPackageError", "OfflineError", "RegistryError", "UnknownModelError", "explain", "human_size"]


class DownloadError(ValueError):
    """A download failed for a reason the user can fix; the message says how."""


class RepoNotFoundError(DownloadError):
    pass


class HubUnreachableError(DownloadError):
    pass


class DiskFullError(DownloadError):
    pass


class DownloadInterruptedError(DownloadError):
    pass


class MissingPackageError(DownloadError):
    pass


class OfflineError(DownloadError):
    pass


def human_size(n: Optional[float]) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_space(where: Path) -> int:
    """Free bytes on the device `where` is (or will be) on."""
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free


def disk_full(where: Path, needed: Optional[int]) -> DiskFullError:
    """The error for a full disk at `where`: how much is free there and how much the download still needed."""
    free = free_space(where)
    return DiskFullError(f"no space left on the device of {where} ({human_size(free)} free, the download needs "
                         f"{human_size(needed)} more); free some space or pass --local-dir / --cache-dir on "
                         f"another disk, then run the same command again to resume")


def _http_status(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "ProxyError"}) \
        and "RemoteProtocolError" not in names


def _transfer_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"RemoteProtocolError", "ReadError", "ReadTimeout", "TimeoutException", "StreamError"})


def explain(exc: BaseException, *, repo_id: str, endpoint: str, revision: Optional[str],
            current_file: Optional[str] = None, partial: Optional[tuple[int, Optional[int]]] = None,
            where: Optional[Path] = None, needed: Optional[int] = None) -> Optional[DownloadError]:
    """The `DownloadError` that says what `exc` means for this download, or None if it is not a download problem.

    `partial` is (bytes kept, file size) of the file being transferred when `exc` happened.
    """
    from huggingface_hub import errors as hf

    name = type(exc).__name__
    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, DownloadError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return disk_full(where or Path(exc.filename or "."), needed)
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return OfflineError(f"{repo_id}: downloads are disabled because HF_HUB_OFFLINE=1 is set; unset it to download")
    if isinstance(exc, hf.GatedRepoError):
        return RepoNotFoundError(f"{repo_id}: the repository on {endpoint} is gated; accept its terms on the hub "
                                 f"and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return RepoNotFoundError(f"{repo_id}: revision {revision!r} not found on {endpoint}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return RepoNotFoundError(f"{repo_id}: repository not found on {endpoint}{rev} (check the id and the "
                                 f"revision; a private repository needs a token: HF_TOKEN)")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return RepoNotFoundError(f"{repo_id}: file {current_file or '?'} not found on {endpoint}{rev}")
    interrupted = _transfer_error(exc) or (_http_status(exc) or 0) >= 500 or "Consistency check failed" in str(exc)
    if current_file is not None and partial is not None and (interrupted or _connection_error(exc)):
        kept, size = partial
        of = f" of {human_size(size)}" if size else ""
        return DownloadInterruptedError(
            f"{repo_id}: download of {current_file} interrupted after {human_size(kept)}{of} ({name}: "
            f"{_first_line(exc)}); run the same command again to resume")
    if _connection_error(exc) or isinstance(exc, hf.LocalEntryNotFoundError) or name == "ConnectTimeout":
        return HubUnreachableError(f"cannot reach the hub at {endpoint} ({name}: {_first_line(exc)}); check the "
                                   f"network or {MIRROR_HINT}")
    if _transfer_error(exc) or _http_status(exc) is not None:
        return DownloadError(f"{repo_id}: request to {endpoint} failed ({name}: {_first_line(exc)}); run the same "
                             f"command again, or {MIRROR_HINT}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
