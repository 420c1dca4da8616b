"""The contracts between the engine and its users (serve, webui, agent, bench), as typing Protocols.

Both engines implement them: the native `AsyncEngine` and the `TurboMindEngine` adapter (puyu/serve/turbomind.py);
users are typed against these, never against one engine, so mypy checks every engine against every user.
`generate` takes a string (tokenised as is), token ids, or chat messages (rendered with the model's chat template),
may raise ValueError (a prompt too long, an id out of range) before streaming, and streams `StreamOutput` deltas;
the last one carries `finish_reason`. Leaving the stream early aborts the request.
"""
from __future__ import annotations

from typing import Any, AsyncGenerator, Optional, Protocol, Sequence, Union, cast

from ..config import GenerationConfig
from .errors import PromptTooLongError
from .outputs import StreamOutput

Prompt = Union[str, list[int], list[dict]]


class TokenizerClient(Protocol):
    chat_template: str
    bos_token: str
    eos_token: str
    vocab_rows: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def check_ids(self, ids: Sequence[int], what: str = "token id") -> None: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


class EngineClient(Protocol):
    @property
    def tokenizer(self) -> TokenizerClient: ...

    @property
    def model_name(self) -> str: ...

    @property
    def session_len(self) -> int: ...

    def generate(self, prompt: Prompt, gen_config: GenerationConfig,
                 request_id: Optional[str] = None) -> AsyncGenerator[StreamOutput, None]: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def prompt_token_ids(tokenizer: TokenizerClient, prompt: Prompt, session_len: int) -> list[int]:
    """Token ids of a prompt, the same for every engine: a string (tokenised as is, with the checkpoint's BOS), token
    ids (checked against the vocabulary), or chat messages (rendered with the chat template). ValueError naming
    `prompt` when it is none of these or empty; PromptTooLongError beyond `session_len`."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = cast(list[dict], prompt)
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    elif isinstance(prompt, (list, tuple)):
        ids = list(cast(list[int], prompt))
        tokenizer.check_ids(ids, "prompt token id")
    else:
        raise ValueError(f"prompt: must be a string, a list of token ids or a list of chat messages, "
                         f"got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt: empty (no tokens)")
    if len(ids) > session_len:
        raise PromptTooLongError(len(ids), session_len)
    return ids
