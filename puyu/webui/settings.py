"""Generation settings as the web page shows them, and their translation to the engine and to OpenAI requests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_K,
                      DEFAULT_TOP_P, GenerationConfig)


@dataclass(frozen=True)
class ChatSettings:
    """The sliders of the chat tab. `temperature == 0` means greedy decoding."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the defaults of the server and `puyu chat` (config.py)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    def __post_init__(self) -> None:
        # GenerationConfig validates every field and names the one that is wrong.
        self.to_generation_config()

    @classmethod
    def from_ui(cls, max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any,
                repetition_penalty: Any) -> "ChatSettings":
        """Gradio sliders deliver floats (and None for an emptied number box); coerce to the typed fields."""
        def num(name: str, value: Any, kind: type) -> Any:
            if value is None or value == "":
                raise ValueError(f"{name}: a value is required")
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: not a number: {value!r}") from None

        return cls(max_new_tokens=num("max_new_tokens", max_new_tokens, int),
                   temperature=num("temperature", temperature, float), top_p=num("top_p", top_p, float),
                   top_k=num("top_k", top_k, int),
                   repetition_penalty=num("repetition_penalty", repetition_penalty, float))

    def to_generation_config(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                repetition_penalty=self.repetition_penalty)

    def to_openai_kwargs(self) -> dict[str, Any]:
        """Standard OpenAI fields plus the LMDeploy extras (`top_k`, `repetition_penalty`) in `extra_body`."""
        return {"max_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "extra_body": {"top_k": self.top_k, "repetition_penalty": self.repetition_penalty}}
