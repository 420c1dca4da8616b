"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from fastapi.responses import JSONResponse

from .protocol import UnsupportedFieldError


class APIError(Exception):
    """An error answered to the client; `status` is the HTTP status code."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Optional[dict[str, str]] = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


MESSAGE_TAGS = ("system", "developer", "user", "assistant", "tool")


def engine_failure(detail: str) -> APIError:
    """A request the engine could not finish (the server and the other requests go on)."""
    return APIError(500, f"the engine failed on this request: {detail}", code="engine_error")


def _loc(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out, prev = "", None
    for part in loc:
        prev, after_index = part, isinstance(prev, int)
        if part == "body" and not out:
            continue
        if after_index and part in MESSAGE_TAGS:
            continue  # the message class pydantic chose by its 'role'
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "function-after", "function-before") \
                or "[" in str(part) or str(part).startswith(("Literal", "list", "function-")):
            continue  # union branch labels pydantic adds to the location
        else:
            out += ("." if out else "") + str(part)
    return out


def _describe(err: dict[str, Any]) -> tuple[str, Optional[str], str]:
    """One pydantic error -> (message, param, code)."""
    kind, loc = err.get("type", ""), _loc(err.get("loc", ()))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"malformed JSON in the request body: {detail}".rstrip(": "), None, "invalid_json"
    if kind == "missing":
        return f"missing required field '{loc}'", loc, "missing_field"
    if kind in ("union_tag_not_found", "union_tag_invalid"):  # the message type is chosen by a tag field ('role')
        tag = str((err.get("ctx") or {}).get("discriminator", "role")).strip("'")
        field_loc = f"{loc}.{tag}" if loc else tag
        if kind == "union_tag_not_found":
            return f"missing required field '{field_loc}'", field_loc, "missing_field"
        expected = (err.get("ctx") or {}).get("expected_tags", "")
        return f"invalid value for '{field_loc}': must be one of {expected}", field_loc, "invalid_value"
    if kind == "extra_forbidden":
        return f"unknown field '{loc}' (not part of this API)", loc, "unknown_field"
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, UnsupportedFieldError):
        return str(exc), exc.fields[0], "unsupported_field"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        return msg, None, "invalid_value"
    return f"invalid value for '{loc}': {msg}", loc, "invalid_value"


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> APIError:
    """All validation problems of a request in one 400; `param` is the first field named.

    Union types make pydantic report one error per branch for the same field; those are merged."""
    if not errors:
        return bad_request("invalid request body")
    described = [_describe(e) for e in errors]
    if any(code == "invalid_json" for _, _, code in described):
        msg, _, _ = next(d for d in described if d[2] == "invalid_json")
        return bad_request(msg, None, "invalid_json")
    if any(e.get("loc") in (("body",), ()) and e.get("type") == "missing" for e in errors):
        return bad_request("the request body is empty; send a JSON object", None, "invalid_body")
    if any(e.get("loc") in (("body",), ()) and e.get("type") in ("model_attributes_type", "dict_type")
           for e in errors):
        return bad_request("the request body must be a JSON object", None, "invalid_body")
    seen: dict[Optional[str], tuple[str, str]] = {}
    for msg, param, code in described:
        if param not in seen:
            seen[param] = (msg, code)
    first_param, (first_msg, first_code) = next(iter(seen.items()))
    message = "; ".join(m for m, _ in seen.values())
    return bad_request(message, first_param, first_code)
