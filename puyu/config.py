"""Typed configuration for puyu, in one place.

`EngineConfig` holds the engine options (names follow LMDeploy's `TurbomindEngineConfig` so users can switch),
`GenerationConfig` the per-request sampling options (names follow LMDeploy's `GenerationConfig`).
Both validate themselves and raise `ConfigError` naming the field that is wrong.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


QUANT_POLICIES = (0, 4, 8)
# Below this temperature `logits / temperature` overflows float32: such a request is decoded greedily (its limit).
MIN_TEMPERATURE = 1e-4
# A repetition penalty outside this range overflows or flushes the logits it divides/multiplies.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
DTYPES = ("auto", "float32", "float16", "bfloat16")

# The sampling defaults of every front end: the server (for the fields a request leaves out), `puyu chat` and the web
# UI's sliders. Mild nucleus sampling with a small repetition penalty: greedy decoding makes a small model loop ("I'm
# glad to have you." x60). The penalty is the default only when sampling: temperature 0 stays plain greedy decoding,
# reproducible and equal to transformers' (see `default_repetition_penalty`).
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 40
DEFAULT_REPETITION_PENALTY = 1.05
DEFAULT_MAX_NEW_TOKENS = 512  # `puyu chat` and the web UI; the server's default is the rest of the session (OpenAI)


def default_repetition_penalty(temperature: float) -> float:
    """The repetition penalty when none is given: `DEFAULT_REPETITION_PENALTY` when sampling, 1.0 when greedy."""
    return DEFAULT_REPETITION_PENALTY if temperature >= MIN_TEMPERATURE else 1.0


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field with what its command-line option needs: `help`, and optionally `type` (when the annotation
    is a union) and `choices`. `puyu/serve/options.py` generates --field-name from these, so an option is added once."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineConfig:
    """Options of the native engine (and, where they apply, of TurboMind)."""

    quant_policy: int = option(0, "KV cache quantisation: 8 (int8), 4 (int4), 0 (off)", choices=QUANT_POLICIES)
    session_len: Optional[int] = option(None, "max tokens of one conversation (default: the model's context)",
                                        type=int)
    cache_block_seq_len: int = option(64, "tokens per KV block")
    cache_max_entry_count: Union[float, int] = option(
        0.5, "KV cache: a fraction of free memory (< 1) or a number of blocks (>= 1)", type=float)
    max_batch_size: int = option(64, "sequences in one step at most")
    max_prefill_token_num: int = option(2048, "token budget of one step (longer prompts are prefilled in chunks)")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of earlier prompts with the same prefix")
    device: str = option("cpu", "cpu | cuda | cuda:N")
    dtype: str = option("auto", "auto (the checkpoint's dtype on cuda; bf16 where the cpu has AVX-512 BF16, else "
                                "float32) | float32 | float16 | bfloat16", choices=DTYPES)
    tp: int = option(1, "tensor parallel degree (TurboMind)", choices=(1, 2, 4, 8))
    num_threads: Optional[int] = option(None, "torch threads on cpu (default: torch's)", type=int)
    kernels: str = option("auto", "auto: puyu's cpu kernels where they build; torch: torch ops only (the reference)",
                          choices=("auto", "torch"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.quant_policy not in QUANT_POLICIES:
            raise ConfigError("quant_policy", f"must be one of 0 (off), 8 (int8) or 4 (int4), got {self.quant_policy!r}")
        if self.session_len is not None and (not isinstance(self.session_len, int) or self.session_len < 1):
            raise ConfigError("session_len", f"must be a positive integer, got {self.session_len!r}")
        if not isinstance(self.cache_block_seq_len, int) or self.cache_block_seq_len < 1:
            raise ConfigError("cache_block_seq_len", f"must be a positive integer, got {self.cache_block_seq_len!r}")
        c = self.cache_max_entry_count
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
            raise ConfigError("cache_max_entry_count", f"must be a fraction in (0, 1) or a block count >= 1, got {c!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError("max_batch_size", f"must be a positive integer, got {self.max_batch_size!r}")
        if not isinstance(self.max_prefill_token_num, int) or self.max_prefill_token_num < 1:
            raise ConfigError("max_prefill_token_num", f"must be a positive integer, got {self.max_prefill_token_num!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("device", f"must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.kernels not in ("auto", "torch"):
            raise ConfigError("kernels", f"must be 'auto' or 'torch', got {self.kernels!r}")
        if self.tp not in (1, 2, 4, 8):
            raise ConfigError("tp", f"must be 1, 2, 4 or 8, got {self.tp!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown engine option (known: {', '.join(sorted(known))})")
        return cls(**options)


GUIDE_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "tool_call")


@dataclass(frozen=True)
class Guide:
    """Constrained decoding of one request: every sampled token keeps the output inside a grammar.

    `kind`: json_object (any JSON object), json_schema (`spec` a JSON schema), regex, choice (`spec` a JSON list of
    strings), grammar (EBNF), tool_call (`spec` JSON: {"functions": [{name, parameters}], "named": bool}, an InternLM2
    action call body). `field`: the request field it came from, named in errors (a schema that cannot compile)."""

    kind: str
    spec: str = ""
    field: str = "guide"


@dataclass
class GenerationConfig:
    """Sampling options of one request. `do_sample=False` (the default) is greedy decoding."""

    n: int = 1
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    random_seed: Optional[int] = None
    stop_words: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None  # None: none; 0: the chosen token's; k: also the top-k alternatives
    cache_salt: Optional[str] = None  # prefix-cache namespace: cached blocks are shared only under the same salt
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely one's (after temperature)
    logit_bias: Optional[dict[int, float]] = None  # added to the logits of these ids before sampling
    include_stop_str_in_output: bool = False  # a matched stop word stays at the end of the text
    guide: Optional[Guide] = None  # constrained decoding (structured output, forced tool calls)
    # logprobs of the prompt's tokens (each but the first, given those before it), with k alternatives; such a
    # request skips the prefix cache (every prompt position must be computed)
    prompt_logprobs: Optional[int] = None
    adapter_name: Optional[str] = None  # the loaded LoRA adapter this request runs with (None: the base model)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(name, f"{what}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n == 1, "n", "only n=1 is supported")
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0")
        check(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature", "must be >= 0")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be >= 0")
        lo, hi = REPETITION_PENALTY_RANGE
        check(isinstance(self.repetition_penalty, (int, float)) and lo <= self.repetition_penalty <= hi,
              "repetition_penalty", f"must be in [{lo}, {hi:g}]")
        check(isinstance(self.presence_penalty, (int, float)) and -2 <= self.presence_penalty <= 2,
              "presence_penalty", "must be in [-2, 2]")
        check(isinstance(self.frequency_penalty, (int, float)) and -2 <= self.frequency_penalty <= 2,
              "frequency_penalty", "must be in [-2, 2]")
        check(self.random_seed is None or isinstance(self.random_seed, int), "random_seed", "must be an integer")
        check(self.stop_words is None or all(isinstance(s, str) and s for s in self.stop_words),
              "stop_words", "must be a list of non-empty strings")
        check(self.stop_token_ids is None or all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "must be a list of non-negative integers")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              "logprobs", "must be between 0 and 20")
        check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt != ""),
              "cache_salt", "must be a non-empty string")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
              "prompt_logprobs", "must be between 0 and 20")
        check(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.logit_bias is None or all(isinstance(k, int) and k >= 0 and isinstance(v, (int, float))
                                             and -100 <= v <= 100 for k, v in self.logit_bias.items()),
              "logit_bias", "must map token ids to numbers in [-100, 100]")
        check(self.guide is None or (isinstance(self.guide, Guide) and self.guide.kind in GUIDE_KINDS),
              "guide", f"must be a Guide of kind {', '.join(GUIDE_KINDS)}")
        check(self.adapter_name is None or (isinstance(self.adapter_name, str) and self.adapter_name != ""),
              "adapter_name", "must be a non-empty string")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < MIN_TEMPERATURE or self.top_k == 1
