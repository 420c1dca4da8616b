"""POST /tokenize and /detokenize in vLLM's shapes, so that clients (and `puyu bench serve`) can count tokens with
the served model's own tokenizer without having it on disk.

/tokenize: `{"model"?, "prompt": str, "add_special_tokens"?: true}` or `{"model"?, "messages": [...],
"add_generation_prompt"?: true}` (rendered with the chat template, as a chat request would be) ->
`{"count", "max_model_len", "tokens", "token_strs"}`. /detokenize: `{"model"?, "tokens": [ids]}` -> `{"prompt"}`.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from pydantic import Field, model_validator

from .errors import bad_request
from .protocol import ChatMessage, _Strict
from .responses import token_str
from .tools import to_internlm2_messages

MAX_TOKENS_IN = 1 << 20


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(default=None, min_length=1)
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int] = Field(max_length=MAX_TOKENS_IN)


def tokenize(tokenizer: Any, req: TokenizeRequest, max_model_len: int) -> dict[str, Any]:
    """Token ids as the engine would see them: a prompt with the tokenizer's special tokens (BOS) unless
    add_special_tokens is false; messages rendered with the chat template (which writes its own special tokens)."""
    if req.prompt is not None:
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        messages = to_internlm2_messages(req.messages or [], None)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        ids = tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
    strs = [token_str(tokenizer, i) for i in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(tokenizer: Any, req: DetokenizeRequest) -> dict[str, Any]:
    try:
        tokenizer.check_ids(req.tokens, "token id")
    except ValueError as exc:
        raise bad_request(str(exc), "tokens") from None
    return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}


def supports(tokenizer: Any) -> bool:
    """Only puyu's own tokenizer (the native engine's) is served here; other back-ends answer 404."""
    return all(hasattr(tokenizer, name) for name in ("check_ids", "apply_chat_template", "encode", "decode"))


def add_routes(app: Any, engine: Any, check_model: Any) -> None:
    """Mount both endpoints (tokenising a long text takes a while: off the event loop)."""
    if not supports(getattr(engine, "tokenizer", None)):
        return

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            check_model(body.model)
        return await asyncio.to_thread(tokenize, engine.tokenizer, body, int(engine.session_len))

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            check_model(body.model)
        return await asyncio.to_thread(detokenize, engine.tokenizer, body)
