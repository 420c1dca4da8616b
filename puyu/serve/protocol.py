"""Request models of the OpenAI-compatible API (pydantic), and their mapping onto `GenerationConfig`.

Every request model is strict (no coercion: `"10"` is not an integer, `"yes"` not a boolean, `true` not a token id) and
forbids unknown fields, so a typo or a field we do not implement is a 400 that names it instead of
being silently ignored. OpenAI fields we know but cannot honour are declared (so the schema documents them) and are
rejected when they carry a value; `null` asks for nothing and is accepted. LMDeploy's extra sampling fields are
accepted because the native engine honours them, and so are vLLM's (`min_tokens`, `min_p`, `stop_token_ids`,
`include_stop_str_in_output`, `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from ..config import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, REPETITION_PENALTY_RANGE, GenerationConfig,
                      Guide, default_repetition_penalty)

MAX_N = 16
MAX_STOP = 16
MAX_STOP_LEN = 1024  # characters of one stop string
MAX_JSON_DEPTH = 64  # nesting of tool schemas and tool-call arguments


def _text_problem(value: Any, depth: int = 0) -> Optional[str]:
    """Why `value` (a parsed JSON value) cannot be used as text: a lone surrogate, or nesting deeper than allowed."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "contains a lone surrogate (invalid Unicode); send valid UTF-8 text"
        elif isinstance(v, (list, tuple, dict)):
            if d >= MAX_JSON_DEPTH:
                return f"is nested more than {MAX_JSON_DEPTH} levels deep"
            items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
            for k, x in items:
                if k is not None:
                    stack.append((k, d + 1))
                stack.append((x, d + 1))
    return None


class UnsupportedFieldError(ValueError):
    """A known OpenAI field that this server cannot honour was given a value."""

    def __init__(self, fields: list[str], why: str = "not supported by this server"):
        self.fields = fields
        super().__init__(f"unsupported field{'s' if len(fields) > 1 else ''} {', '.join(map(repr, fields))}: {why}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        """Every string (and every string inside a JSON object) is valid Unicode; free-form JSON is not too deep."""
        if isinstance(value, (str, list, tuple, dict)):
            problem = _text_problem(value)
            if problem:
                raise ValueError(problem)
        return value


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str

    @field_validator("arguments", mode="after")
    @classmethod
    def _arguments_depth(cls, value: str) -> str:
        """Arguments are kept verbatim when they are not JSON, but JSON nested too deep is an error (not a crash)."""
        try:
            parsed = json.loads(value) if value else None
        except json.JSONDecodeError:
            return value
        except RecursionError:
            raise ValueError(f"is nested more than {MAX_JSON_DEPTH} levels deep") from None
        problem = _text_problem(parsed)
        if problem:
            raise ValueError(problem)
        return value


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="a data: URL (data:image/png;base64,...) or, under --allowed-local-media-path, "
                                 "a local file path or file:// URL")
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class _Message(_Strict):
    def text(self) -> str:
        """The text of the content (image parts are not text: see `images`)."""
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content if isinstance(part, TextPart))


Content = Union[str, list[TextPart]]
UserContent = Union[str, list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]]]


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content
    name: Optional[str] = None


class UserMessage(_Message):
    role: Literal["user"]
    content: UserContent
    name: Optional[str] = Field(default=None, description="rendered as `user name=...` (e.g. 'file' for uploads)")


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Optional[Content] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class JSONSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}")
        return self

    def guide(self) -> Optional[Guide]:
        if self.type == "json_object":
            return Guide("json_object", "", "response_format")
        if self.type == "json_schema":
            assert self.json_schema is not None and self.json_schema.schema_ is not None
            return Guide("json_schema", json.dumps(self.json_schema.schema_, ensure_ascii=False),
                         "response_format.json_schema.schema")
        return None


class _Sampling(_Strict):
    """Fields shared by chat and completion requests."""

    model: str
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    n: Optional[int] = Field(default=None, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**63 - 1 - MAX_N)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    cache_salt: Optional[str] = Field(default=None, min_length=1, max_length=256)  # vLLM's: a prefix-cache namespace
    user: Optional[str] = Field(default=None, description="Recorded in the server log with the request id.")
    # LMDeploy's extras
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, ge=REPETITION_PENALTY_RANGE[0],
                                                le=REPETITION_PENALTY_RANGE[1])  # wider overflows the logits
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    min_new_tokens: Optional[int] = Field(default=None, ge=0)
    session_id: Optional[int] = Field(default=None, ge=-(2**63), lt=2**63, description="LMDeploy's session id; part of the request id.")
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = Field(
        default=None, max_length=1024, description="token id (as a string) -> bias added to its logit")
    # vLLM's extras
    min_tokens: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = Field(default=None, max_length=MAX_STOP)
    include_stop_str_in_output: Optional[bool] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = Field(default=None, min_length=1)
    guided_choice: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(default=None, min_length=1)
    guided_grammar: Optional[str] = Field(default=None, min_length=1, description="EBNF (xgrammar's dialect)")
    guided_decoding_backend: Optional[Literal["xgrammar"]] = None
    # known OpenAI fields we cannot honour: rejected when given a value (left out of /openapi.json)
    service_tier: SkipJsonSchema[Optional[str]] = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("service_tier",)

    @model_validator(mode="after")
    def _check_common(self) -> "_Sampling":
        given = [f for f in self.UNSUPPORTED if getattr(self, f) is not None]
        if given:
            raise UnsupportedFieldError(given)
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed with 'stream': true")
        if self.min_tokens is not None and self.min_new_tokens is not None and self.min_tokens != self.min_new_tokens:
            raise ValueError("'min_tokens' and 'min_new_tokens' disagree; give one")
        guides = self.guides()
        if len(guides) > 1:
            raise ValueError(f"give one of {', '.join(repr(g.field) for g in guides)}: they cannot be combined")
        return self

    def guides(self) -> list[Guide]:
        """The constraints this request asks for (at most one is allowed)."""
        out = []
        if self.guided_json is not None:
            spec = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json,
                                                                                          ensure_ascii=False)
            out.append(Guide("json_schema", spec, "guided_json"))
        if self.guided_regex is not None:
            out.append(Guide("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            out.append(Guide("choice", json.dumps(self.guided_choice, ensure_ascii=False), "guided_choice"))
        if self.guided_grammar is not None:
            out.append(Guide("grammar", self.guided_grammar, "guided_grammar"))
        return out

    def guide(self) -> Optional[Guide]:
        guides = self.guides()
        return guides[0] if guides else None

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _token_id_keys(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if value and not all(k.isascii() and k.isdigit() for k in value):
            raise ValueError("keys must be token ids (decimal strings)")
        return value

    @field_validator("stop", mode="after")
    @classmethod
    def _bounded_stop(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP or not all(stops) or any(len(w) > MAX_STOP_LEN for w in stops):
            raise ValueError(f"must be at most {MAX_STOP} non-empty strings of at most {MAX_STOP_LEN} characters each")
        return value

    def stop_words(self) -> Optional[list[str]]:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def generation_config(self, max_new_tokens: int, logprobs: Optional[int], skip_special: bool,
                          choice: int = 0) -> GenerationConfig:
        """The engine's sampling options for choice number `choice` (n>1 runs n requests with seeds seed+i)."""
        # omitted sampling fields take puyu's defaults (config.py), the same as `puyu chat` and the web UI
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        seed = None if self.seed is None else self.seed + choice
        min_new = self.min_tokens if self.min_tokens is not None else (self.min_new_tokens or 0)
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new, min_p=self.min_p or 0.0,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            stop_token_ids=list(self.stop_token_ids) if self.stop_token_ids else None,
            include_stop_str_in_output=bool(self.include_stop_str_in_output), guide=self.guide(),
            do_sample=temperature > 0, temperature=temperature,  # GenerationConfig decodes tiny ones greedily
            top_p=DEFAULT_TOP_P if self.top_p is None else self.top_p,
            top_k=DEFAULT_TOP_K if self.top_k is None else self.top_k,
            repetition_penalty=(default_repetition_penalty(temperature) if self.repetition_penalty is None
                                else self.repetition_penalty),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            random_seed=seed, stop_words=self.stop_words(), ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=skip_special, logprobs=logprobs)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Tool]] = Field(default=None, min_length=1)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    # known OpenAI chat fields we cannot honour
    functions: SkipJsonSchema[Optional[list[Any]]] = None
    function_call: SkipJsonSchema[Optional[Any]] = None
    audio: SkipJsonSchema[Optional[Any]] = None
    modalities: SkipJsonSchema[Optional[list[str]]] = None
    prediction: SkipJsonSchema[Optional[Any]] = None
    store: SkipJsonSchema[Optional[bool]] = None
    metadata: SkipJsonSchema[Optional[dict[str, Any]]] = None
    reasoning_effort: SkipJsonSchema[Optional[str]] = None
    web_search_options: SkipJsonSchema[Optional[Any]] = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "service_tier", "functions", "function_call", "audio", "modalities", "prediction",
        "store", "metadata", "reasoning_effort", "web_search_options")

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("'max_tokens' and 'max_completion_tokens' disagree; give one")
        names = {t.function.name for t in self.tools or []}
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"'tool_choice' names {self.tool_choice.function.name!r}, which is not in 'tools'")
        if self.tool_choice in ("required",) and not self.tools:
            raise ValueError("'tool_choice': 'required' needs 'tools'")
        if self.forces_tool_call() and self.guides():
            raise ValueError("'tool_choice' required or named forces a tool call: it cannot be combined with "
                             f"{self.guides()[0].field!r}")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def forces_tool_call(self) -> bool:
        return self.uses_tools() and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    def guides(self) -> list[Guide]:
        extra = self.response_format.guide() if self.response_format is not None else None
        return super().guides() + ([extra] if extra is not None else [])

    def guide(self) -> Optional[Guide]:
        """The request's constraint: a forced tool call (its arguments match the function's schema), else
        `response_format` or a vLLM `guided_*` field."""
        if self.forces_tool_call():
            tools = [t.function for t in self.tools or []]
            named = isinstance(self.tool_choice, NamedToolChoice)
            if named:
                tools = [f for f in tools if f.name == self.tool_choice.function.name]  # type: ignore[union-attr]
            functions = [{"name": f.name, "parameters": f.parameters} for f in tools]
            return Guide("tool_call", json.dumps({"functions": functions, "named": named}, ensure_ascii=False),
                         "tools.function.parameters")
        return super().guide()


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Optional[int] = Field(default=16, ge=1)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: Optional[bool] = False
    # LMDeploy's client always sends this one; only the default behaviour exists here
    spaces_between_special_tokens: Optional[bool] = None
    # known OpenAI completion fields we cannot honour
    suffix: SkipJsonSchema[Optional[str]] = None
    best_of: Optional[int] = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("service_tier", "suffix")

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise UnsupportedFieldError(["best_of"], "only best_of == n is supported")
        if self.spaces_between_special_tokens is False:
            raise UnsupportedFieldError(["spaces_between_special_tokens"], "only true is supported")
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("'prompt' must not be empty")
        if len(prompts) * (self.n or 1) > 64:
            raise ValueError("'prompt' x 'n' must be at most 64 choices")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of prompts (each a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
