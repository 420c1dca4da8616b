"""Images of OpenAI content parts: `image_url` -> decoded PIL image, or a 400 naming the part.

Accepted: `data:image/...;base64,...` URLs; local files (a path or `file://` URL) only when the server was started
with `--allowed-local-media-path DIR` and the file's real path lies inside DIR (a link out of it is refused).
Remote URLs are refused: the server does not fetch from the network.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from ..engine.multimodal import MAX_IMAGE_BYTES, decode_image
from .errors import APIError, bad_request


def _data_url(url: str, field: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"{field}: a data: URL must be base64 (data:image/png;base64,...)", field)
    mime = header[len("data:"):-len(";base64")]
    if mime and not mime.startswith("image/"):
        raise bad_request(f"{field}: media type {mime!r} is not an image", field)
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise bad_request(f"{field}: image is over the limit of {MAX_IMAGE_BYTES} bytes", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field}: the data: URL is not valid base64", field) from None


def _local_file(url: str, field: str, allowed: Optional[Path]) -> bytes:
    if allowed is None:
        raise bad_request(f"{field}: local image paths are refused; start the server with "
                          f"--allowed-local-media-path DIR to allow files under DIR, or send a data: URL", field)
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = allowed / path
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise bad_request(f"{field}: no such file {raw!r} under the allowed media folder", field) from None
    if not real.is_relative_to(allowed) or not real.is_file():
        raise bad_request(f"{field}: {raw!r} is outside the allowed media folder", field)
    if real.stat().st_size > MAX_IMAGE_BYTES:
        raise bad_request(f"{field}: image is over the limit of {MAX_IMAGE_BYTES} bytes", field)
    return real.read_bytes()


def fetch_image_bytes(url: str, field: str, allowed: Optional[Path]) -> bytes:
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        return _data_url(url, field)
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise bad_request(f"{field}: remote image URLs are not fetched (this server is offline); send the image as "
                          f"a data: URL", field)
    if scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter parses as a scheme)
        return _local_file(url, field, allowed)
    raise bad_request(f"{field}: unsupported URL scheme {scheme!r}", field)


def load_image_part(url: str, field: str, allowed: Optional[Path]) -> Any:
    """The decoded image of one `image_url` part (APIError 400 naming `field` when it cannot be one)."""
    data = fetch_image_bytes(url, field, allowed)
    try:
        return decode_image(data, field)
    except ValueError as exc:
        raise bad_request(str(exc), field) from None


def has_vision(engine: Any) -> bool:
    return bool(getattr(getattr(engine, "spec", None), "vision", ""))


def no_vision(model: str, field: str) -> APIError:
    return bad_request(f"{field}: model {model} has no vision (it takes text only); send text content", field)
