"""What every puyu Lagent model shares: InternLM2 prompt rendering and Lagent's streaming contract.

Lagent's `stream_chat` contract: yield `(ModelStatusCode.STREAM_ING, cumulative_text, None)` while text arrives,
then `(ModelStatusCode.END, text, None)`; a negative status ends the stream with an error. Special tokens stay in
the text (the agent parses `<|action_start|>` etc.), and the text is cut at `<|im_end|>` (and any stop word), at
which point the underlying request is closed so the backend can free it. Subclasses only implement
`_stream(prompt, params)`, an iterator of text deltas.
"""
from __future__ import annotations

import threading
from typing import Iterator, Optional, Union, cast

from lagent.llms import BaseModel
from lagent.llms.meta_template import INTERNLM2_META
from lagent.schema import ModelStatusCode

IM_END = "<|im_end|>"


def cut_at_stop(text: str, stops: list[str]) -> Optional[str]:
    """The text before the earliest stop string, or None when no stop string occurs."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[:min(hits)] if hits else None


class StreamingModel(BaseModel):
    """Base of puyu's Lagent models. `bos` is prepended to rendered prompts (the engine uses strings as given)."""

    def __init__(self, path: str, *, bos: str = "<s>", max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 stop_words: Optional[list[str]] = None) -> None:
        super().__init__(path, meta_template=INTERNLM2_META, max_new_tokens=max_new_tokens, top_p=top_p,
                         top_k=top_k, temperature=temperature, repetition_penalty=repetition_penalty,
                         stop_words=stop_words or [])
        self.bos = bos
        self._local = threading.local()

    # Per-thread results of the latest call: one model instance serves concurrent runs (`agent batch`).
    last_usage = property(lambda self: getattr(self._local, "usage", {}),
                          lambda self, v: setattr(self._local, "usage", v))
    last_error = property(lambda self: getattr(self._local, "error", None),
                          lambda self, v: setattr(self._local, "error", v))
    last_finish_reason = property(lambda self: getattr(self._local, "finish", None),
                                  lambda self, v: setattr(self._local, "finish", v))

    def render(self, messages: list[dict]) -> str:
        """The InternLM2 chat prompt for Lagent-formatted messages, ending with `<|im_start|>assistant\\n`."""
        return self.bos + self.template_parser(messages)

    def _stream(self, prompt: str, params: dict) -> Iterator[str]:
        raise NotImplementedError

    def stream_chat(self, inputs: Union[str, list[dict]], **gen_params):
        prompt = inputs if isinstance(inputs, str) else self.render(inputs)
        return self._stream_cumulative(prompt, self.update_gen_params(**gen_params))

    def stream_generate(self, inputs: str, **gen_params):
        return self._stream_cumulative(inputs, self.update_gen_params(**gen_params))

    def _stream_cumulative(self, prompt: str, params: dict):
        stops = [IM_END] + list(params.get("stop_words") or [])
        text = ""
        self.last_error, self.last_usage, self.last_finish_reason = None, {}, None
        deltas = self._stream(prompt, params)
        try:
            for delta in deltas:
                text += delta
                cut = cut_at_stop(text, stops)
                if cut is not None:
                    text = cut
                    self.last_finish_reason = "stop"
                    yield ModelStatusCode.STREAM_ING, text, None
                    break
                if delta:
                    yield ModelStatusCode.STREAM_ING, text, None
        except Exception as exc:  # reported through Lagent's status codes, message kept in last_error
            self.last_error = f"{type(exc).__name__}: {exc}"
            yield ModelStatusCode.SERVER_ERR, text, None
            return
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # abort the request when we stopped reading early
        yield ModelStatusCode.END, text, None

    def generate(self, inputs: Union[str, list[str]], **gen_params) -> Union[str, list[str]]:
        """Non-streaming generation of one prompt or a list (one after another)."""
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        outputs = []
        for prompt in prompts:
            text = ""
            for status, text, _ in self.stream_generate(prompt, **gen_params):  # noqa: B007 (the last text is the reply)
                if status < 0:
                    raise RuntimeError(self.last_error or "generation failed")
            outputs.append(text)
        return outputs[0] if isinstance(inputs, str) else outputs

    def chat(self, inputs: Union[list[dict], list[list[dict]]], **gen_params):
        if inputs and isinstance(inputs[0], list):
            return [self.generate(self.render(m), **gen_params) for m in cast(list[list[dict]], inputs)]
        return self.generate(self.render(cast(list[dict], inputs)), **gen_params)
