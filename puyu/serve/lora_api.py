"""LoRA adapters over HTTP, in vLLM's shapes: a request's `model` names the base model or a loaded adapter;
`/v1/models` lists both (an adapter's card has `parent`: the base, and `root`: its directory);
`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}` change them
at run time (answers: vLLM's plain-text "Success: ..."). A bad adapter is a 400 naming the file and the field.

Only engines with `load_adapter`/`unload_adapter`/`adapters` (the native AsyncEngine) take adapters; on another
backend the endpoints answer 400.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError, bad_request
from .responses import now

SCOPE_KEY = "puyu.adapter"  # where `answer` leaves the request's adapter for `runner.start`


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's load_inplace etc.: accepted, unused
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's lora_int_id
    lora_name: str = Field(min_length=1, max_length=256)


def loaded(engine: Any) -> dict[str, Any]:
    """name -> directory of the engine's loaded adapters (empty for an engine without adapters)."""
    return dict(getattr(engine, "adapters", None) or {})


def adapter_for(engine: Any, served: str, model: str) -> Optional[str]:
    """The adapter a request's `model` selects (None: the base model); 404 for a name that is neither."""
    if model == served:
        return None
    names = loaded(engine)
    if model in names:
        return model
    known = ", ".join(repr(n) for n in (served, *names))
    raise APIError(404, f"the model {model!r} does not exist; this server serves {known}", param="model",
                   code="model_not_found")


def adapter_cards(engine: Any, served: str) -> list[dict[str, Any]]:
    return [{"id": name, "object": "model", "created": now(), "owned_by": "puyu", "parent": served,
             "root": str(path), "max_model_len": int(engine.session_len)} for name, path in loaded(engine).items()]


def _taking(engine: Any) -> None:
    if not hasattr(engine, "load_adapter"):
        raise bad_request("this server's backend does not take LoRA adapters (serve with --backend native)",
                          "lora_name")


def _as_api_error(exc: Exception) -> APIError:
    from ..engine.peft_adapter import AdapterError

    if isinstance(exc, AdapterError):
        return bad_request(str(exc), "lora_path", "invalid_adapter")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), "lora_name")
    raise exc


def add_lora_routes(app: FastAPI, engine: Any, served: str) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        _taking(engine)
        if body.lora_name == served:
            raise bad_request(f"lora_name: {served!r} is the base model's name", "lora_name")
        try:
            await asyncio.wrap_future(engine.load_adapter(body.lora_name, body.lora_path))
        except Exception as exc:
            raise _as_api_error(exc) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        _taking(engine)
        try:
            await asyncio.wrap_future(engine.unload_adapter(body.lora_name))
        except Exception as exc:
            raise _as_api_error(exc) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
