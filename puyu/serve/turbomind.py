"""The TurboMind backend: LMDeploy's engine behind our `AsyncEngine` contract.

`turbomind_options` maps our `EngineConfig` onto the fields of LMDeploy's `TurbomindEngineConfig` (a pure function,
so the mapping is testable where LMDeploy is not installed); `turbomind_engine_config` builds the real class.
`unavailable_reason` says in one line why TurboMind cannot run here (no LMDeploy, no compiled extension, no GPU).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, AsyncGenerator, Optional, Union

from ..config import ConfigError, EngineConfig, GenerationConfig

TM_DTYPES = ("auto", "float16", "bfloat16")


def _model_format(model_path: Optional[Path]) -> Optional[str]:
    """'awq' for an AWQ checkpoint, None (LMDeploy's auto-detection) otherwise."""
    if model_path is None or not (Path(model_path) / "config.json").exists():
        return None
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    method = str((cfg.get("quantization_config") or {}).get("quant_method", "")).lower()
    return "awq" if method == "awq" else None


def turbomind_options(config: EngineConfig, model_path: Optional[Path] = None) -> dict[str, Any]:
    """The keyword arguments of `TurbomindEngineConfig` for our options; ConfigError for what TurboMind lacks."""
    if config.dtype not in TM_DTYPES:
        raise ConfigError("dtype", f"TurboMind supports {', '.join(TM_DTYPES)}, got {config.dtype!r}")
    if config.device == "cpu":
        raise ConfigError("device", "TurboMind runs on CUDA GPUs only; use --backend native on cpu")
    entry = config.cache_max_entry_count
    if not 0 < entry < 1:
        raise ConfigError("cache_max_entry_count", f"TurboMind (LMDeploy 0.7) takes a fraction in (0, 1), got {entry!r}")
    return {
        "dtype": config.dtype,
        "model_format": _model_format(model_path),
        "tp": config.tp,
        "session_len": config.session_len,
        "max_batch_size": config.max_batch_size,
        "cache_max_entry_count": float(entry),
        "cache_block_seq_len": config.cache_block_seq_len,
        "enable_prefix_caching": config.enable_prefix_caching,
        "quant_policy": config.quant_policy,
        "max_prefill_token_num": config.max_prefill_token_num,
    }


def turbomind_engine_config(config: EngineConfig, model_path: Optional[Path] = None) -> Any:
    """LMDeploy's own `TurbomindEngineConfig` (ImportError if LMDeploy is not installed)."""
    from lmdeploy.messages import TurbomindEngineConfig

    return TurbomindEngineConfig(**turbomind_options(config, model_path))


def lmdeploy_generation_config(gen: GenerationConfig) -> Any:
    """Our per-request options as LMDeploy's `GenerationConfig`."""
    from lmdeploy.messages import GenerationConfig as LMDGenerationConfig

    if gen.guide is not None:  # never accepted and then ignored
        raise ConfigError(gen.guide.field, "constrained decoding (structured output, a forced tool call) is not "
                                           "supported by the TurboMind backend; use the native engine")
    for name in ("logit_bias", "prompt_logprobs"):
        if getattr(gen, name):
            raise ConfigError(name, "not supported by the TurboMind backend; use the native engine")
    return LMDGenerationConfig(
        n=1, max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens or None, do_sample=not gen.greedy,
        top_p=gen.top_p, top_k=gen.top_k, temperature=gen.temperature, repetition_penalty=gen.repetition_penalty,
        ignore_eos=gen.ignore_eos, random_seed=gen.random_seed, min_p=gen.min_p, stop_words=gen.stop_words,
        stop_token_ids=gen.stop_token_ids, skip_special_tokens=gen.skip_special_tokens, logprobs=gen.logprobs)


def unavailable_reason() -> Optional[str]:
    """None if TurboMind can run here, else one line saying why not."""
    try:
        import lmdeploy  # noqa: F401
    except ImportError as exc:
        return f"LMDeploy is not installed ({exc}); pip install 'puyu[turbomind]'"
    except Exception as exc:  # a broken install raises anything
        return f"LMDeploy cannot be imported ({type(exc).__name__}: {exc})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "TurboMind needs a CUDA GPU and torch with CUDA; none is available here"
    except Exception as exc:
        return f"torch cannot query CUDA ({exc})"
    try:
        from lmdeploy.turbomind import TurboMind  # noqa: F401  (loads the compiled _turbomind extension)
    except Exception as exc:
        return f"LMDeploy's TurboMind extension cannot be loaded ({type(exc).__name__}: {exc})"
    return None


class TurboMindEngine:
    """Adapts `lmdeploy.pipeline` (TurboMind) to the `AsyncEngine` contract used by the server and the chat.

    The tokenizer is puyu's own (the one the native engine uses, read from the same files): the server renders chat
    templates, checks token ids and counts tokens with it, and TurboMind is always handed token ids, so both backends
    see the same prompt. `stats()`: `waiting` counts requests that have not produced their first output yet (queued
    or in prefill; LMDeploy's pipeline does not expose its queue), `running` those that have.
    """

    def __init__(self, model_path: Union[str, Path], config: EngineConfig, model_name: Optional[str] = None,
                 pipe: Any = None):
        """`pipe`: an already built LMDeploy pipeline (default: `lmdeploy.pipeline` on `model_path`)."""
        from ..convert.spec import read_model_spec
        from ..tokenizer import Tokenizer

        self.config = config
        self.model_path = Path(model_path)
        if pipe is None:
            from lmdeploy import pipeline

            pipe = pipeline(str(model_path), backend_config=turbomind_engine_config(config, self.model_path))
        self.pipe = pipe
        self.spec = read_model_spec(self.model_path)
        self.tokenizer = Tokenizer(self.model_path, self.spec.vocab_size, self.spec.eos_token_ids, self.spec.arch)
        self.model_name = model_name or self.model_path.name
        self.session_len = int(self.pipe.session_len)
        self._ids = itertools.count(1)
        self._waiting = 0
        self._running = 0

    def stats(self) -> dict[str, Any]:
        return {"running": self._running, "waiting": self._waiting}

    def close(self) -> None:
        close = getattr(self.pipe, "close", None)  # LMDeploy's pipeline frees its engine here (where it can)
        if callable(close):
            close()

    async def generate(self, prompt: Any, gen_config: GenerationConfig,
                       request_id: Optional[str] = None) -> AsyncGenerator[Any, None]:
        from puyu.engine import StreamOutput
        from puyu.engine.client import prompt_token_ids

        session_id = next(self._ids)
        ids = prompt_token_ids(self.tokenizer, prompt, self.session_len)
        finished, started = False, False
        self._waiting += 1
        try:
            async for out in self.pipe.generate(messages=None, input_ids=ids, session_id=session_id,
                                                gen_config=lmdeploy_generation_config(gen_config),
                                                sequence_start=True, sequence_end=True):
                if not started:
                    started = True
                    self._waiting, self._running = self._waiting - 1, self._running + 1
                finished = out.finish_reason is not None
                yield StreamOutput(text=out.response, token_ids=list(out.token_ids or []),
                                   finish_reason=out.finish_reason, input_token_len=out.input_token_len,
                                   generate_token_len=out.generate_token_len, logprobs=out.logprobs)
        finally:
            if started:
                self._running -= 1
            else:
                self._waiting -= 1
            if not finished:
                await self.pipe.stop_session(session_id)
