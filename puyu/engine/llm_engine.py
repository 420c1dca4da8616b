"""LLMEngine: the synchronous core. Load a checkpoint, accept requests, run one scheduled step at a time.

Not thread-safe: `AsyncEngine` drives it from a single background thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import ConfigError, EngineConfig, GenerationConfig
from ..convert import load_model_weights
from ..convert.spec import CheckpointError, ModelSpec
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .client import Prompt, prompt_token_ids
from .errors import PromptTooLongError
from .grammar import Grammars, GuideState
from .kv_cache import KVCacheStorage
from .memory import cpu_threads, num_cache_blocks, resolve_device, resolve_dtype
from .model import DecoderModel
from .model_runner import ModelRunner
from .outputs import StreamOutput, TextStream
from .sampler import SampleRequest, SamplingFailed, make_generator, sample, token_logprobs
from .scheduler import Scheduler
from .sequence import ImageSpan, Sequence, TokenUpdate

log = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    text: TextStream
    guide: Optional[GuideState] = None


def resolve_checkpoint(model_path: Union[str, Path, None]) -> Path:
    from ..resolve import resolve_model_path

    text = None if model_path is None else str(model_path)
    looks_local = isinstance(model_path, Path) or (text or "").startswith(("/", "./", "../", "~"))
    if text is not None and looks_local and not Path(text).expanduser().exists():
        raise CheckpointError(f"{text}: no such model directory or file")
    try:
        path = resolve_model_path(text)
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: not a directory")
    return Path(path)


def load_weights(path: Path, config: EngineConfig, device: torch.device
                 ) -> tuple[ModelSpec, dict[str, torch.Tensor], torch.dtype]:
    # an explicit --dtype asks for dense weights; 'auto' keeps a GGUF file's 4-bit linears packed
    spec, weights = load_model_weights(path, None, dequantize=config.dtype != "auto")
    dtype = resolve_dtype(config, spec, device, packed=any(name.endswith(".qweight") for name in weights))
    weights = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() and not _is_quant_param(k)
               else v.to(device) for k, v in weights.items()}
    return spec, weights, dtype


def _is_quant_param(name: str) -> bool:
    """4-bit scales and zero points keep their stored precision (Int4Linear casts them where it computes)."""
    return name.endswith((".scales", ".zeros"))


class LLMEngine:
    def __init__(self, model_path: Union[str, Path, None] = None, config: Optional[EngineConfig] = None,
                 adapters: Optional[dict[str, Union[str, Path]]] = None):
        self.config = config = config or EngineConfig()
        config.validate()
        if config.tp != 1:
            raise ConfigError("tp", "the native engine runs on one device (tp=1); use the TurboMind backend for tp>1")
        self.model_path = resolve_checkpoint(model_path)
        self.model_name = self.model_path.name
        self.device = resolve_device(config)
        cpu_threads(config)
        self.spec, weights, self.dtype = load_weights(self.model_path, config, self.device)
        self.weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())  # sizes the cpu KV cache
        self.model = DecoderModel(self.spec, weights, self.device, config.kernels)
        self.tokenizer = Tokenizer(self.model_path, self.spec.vocab_size, self.spec.eos_token_ids, self.spec.arch)
        self.vision = self._load_vision()
        self.grammars = Grammars(self.tokenizer)
        self._init_cache()
        self.requests: dict[str, _Request] = {}
        self.tokens_generated = 0
        self.adapters: dict[str, Path] = {}  # loaded LoRA adapter name -> its directory
        self._adapter_keys: dict[str, str] = {}
        self._adapter_loads = 0
        for name, adapter_path in (adapters or {}).items():
            self.load_adapter(name, adapter_path)

    def _load_vision(self):
        if not self.spec.vision:
            return None
        from ..convert import is_workspace
        from .xcomposer2_vision import XComposer2Vision

        if is_workspace(self.model_path):
            raise CheckpointError(f"{self.model_path}: a TurboMind workspace holds no vision tower; serve the "
                                  f"HF checkpoint of this {self.spec.model_arch} model")
        vision = XComposer2Vision(self.model_path, self.dtype, self.device)
        if vision.img_size != self.spec.img_size:
            raise CheckpointError(f"{self.model_path / 'config.json'}: img_size {self.spec.img_size} does not match "
                                  f"the CLIP position table ({vision.img_size} px)")
        return vision

    def _init_cache(self) -> None:
        c, s = self.config, self.spec
        session_len = c.session_len or s.session_len
        blocks = num_cache_blocks(c, s, self.dtype, self.device, session_len, self.weight_bytes)
        capacity = blocks * c.cache_block_seq_len
        if capacity < session_len:
            log.warning("session_len %d clamped to the KV cache capacity %d tokens", session_len, capacity)
        self.session_len = min(session_len, capacity)
        self.cache = KVCacheStorage(s.num_layers, blocks, c.cache_block_seq_len, s.num_kv_heads, s.head_dim,
                                    self.dtype, self.device, c.quant_policy)
        self.block_manager = BlockManager(blocks, c.cache_block_seq_len, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, c.max_batch_size, c.max_prefill_token_num, self.session_len)
        self.runner = ModelRunner(self.model, self.cache)

    # ---- LoRA adapters --------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Union[str, Path]) -> None:
        """Load the PEFT LoRA adapter in directory `path` under `name` (requests choose it by
        `GenerationConfig.adapter_name`). Raises AdapterError (the file and the field) or ValueError (the name)."""
        from .peft_adapter import load_peft_adapter

        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"lora_name: must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"lora_name: adapter {name!r} is already loaded")
        if name in self.model.lora.adapters or name == self.model_name:
            raise ValueError(f"lora_name: {name!r} is taken by the model itself")
        layers = load_peft_adapter(path, self.spec, self.dtype, self.device)
        self._adapter_loads += 1
        self.model.lora.add(name, layers)
        self.adapters[name] = Path(path)
        self._adapter_keys[name] = f"{name}#{self._adapter_loads}"

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter; refused while a request runs with it."""
        if name not in self.adapters:
            raise ValueError(f"lora_name: no adapter {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        users = [rid for rid, r in self.requests.items() if r.seq.gen_config.adapter_name == name]
        if users:
            raise ValueError(f"lora_name: adapter {name!r} is in use by {len(users)} running request(s)")
        self.model.lora.remove(name)
        del self.adapters[name], self._adapter_keys[name]

    def check_adapter(self, gen_config: GenerationConfig) -> None:
        """ValueError naming `adapter_name` when it names no loaded adapter."""
        name = gen_config.adapter_name
        if name is not None and name not in self.adapters:
            raise ValueError(f"adapter_name: no adapter {name!r} is loaded "
                             f"(loaded: {', '.join(self.adapters) or 'none'})")

    # ---- requests -------------------------------------------------------------------------------------------------
    def prepare_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string (as is), token ids, or chat messages (rendered with the chat template)."""
        return prompt_token_ids(self.tokenizer, prompt, self.session_len)

    def prepare_request(self, prompt: Prompt) -> tuple[list[int], list[ImageSpan]]:
        """`prepare_prompt`, plus the images of a chat prompt with image parts (a vision model only)."""
        from . import multimodal as mm

        if mm.has_images(prompt) and self.vision is None:
            raise ValueError(f"{mm.first_image_field(prompt)}: model {self.model_name} has no vision "
                             f"(it takes text only)")
        if self.vision is None or not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            return self.prepare_prompt(prompt), []
        messages, images = mm.split_images(prompt)
        messages = mm.with_default_system(messages, mm.XCOMPOSER2_META)
        text = self.tokenizer.apply_chat_template(messages)
        ids, spans = mm.splice(text, images, lambda t: self.tokenizer.encode(t, add_special_tokens=False),
                               self.vision.num_tokens, self._pixels)
        if len(ids) > self.session_len:
            raise PromptTooLongError(len(ids), self.session_len)
        return ids, spans

    def _pixels(self, image) -> torch.Tensor:
        from .xcomposer2_vision import preprocess

        return preprocess(image, self.vision.img_size)

    def _encode_images(self, images: list[ImageSpan]) -> list[ImageSpan]:
        """Run the vision tower on the images' pixels (on the engine thread); spans get their embeddings."""
        todo = [im for im in images if im.embeds is None]
        pixels = [im.pixels for im in todo if im.pixels is not None]
        if len(pixels) != len(todo):
            raise ValueError("an image reached the engine without its pixels")
        if todo:
            feats = self.vision.encode(torch.stack(pixels))
            for im, f in zip(todo, feats):
                im.embeds, im.pixels = f, None
        return images

    def add_request(self, request_id: str, prompt_ids: list[int], gen_config: GenerationConfig,
                    images: Optional[list[ImageSpan]] = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if len(prompt_ids) > self.session_len:
            raise PromptTooLongError(len(prompt_ids), self.session_len)
        gen_config.validate()
        self.check_request(gen_config)
        stop = set(gen_config.stop_token_ids or ())
        if not gen_config.ignore_eos:
            stop |= set(self.tokenizer.stop_token_ids)
        seq = Sequence(request_id, list(prompt_ids), gen_config,
                       generator=None if gen_config.greedy else make_generator(gen_config.random_seed),
                       stop_ids=frozenset(stop), images=self._encode_images(images) if images else [],
                       adapter_key=self._adapter_keys.get(gen_config.adapter_name or ""))
        text = TextStream(self.tokenizer, gen_config.skip_special_tokens, gen_config.stop_words,
                          gen_config.include_stop_str_in_output)
        guide = None if gen_config.guide is None else self.grammars.matcher(gen_config.guide, sorted(stop))
        self.requests[request_id] = _Request(seq, text, guide)
        self.scheduler.add(seq)

    def check_request(self, gen_config: GenerationConfig) -> None:
        """The options that depend on the checkpoint: a loaded adapter, token ids in range, a guide that compiles
        (ValueErrors naming the field)."""
        self.check_adapter(gen_config)
        self.tokenizer.check_ids(gen_config.stop_token_ids or [], "stop_token_ids: id")
        self.tokenizer.check_ids(list(gen_config.logit_bias or {}), "logit_bias: token id")
        if gen_config.guide is not None:
            self.grammars.compile(gen_config.guide)

    def abort(self, request_id: str, reason: str = "abort", error: Optional[str] = None) -> Optional[StreamOutput]:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq, reason)
        return StreamOutput(finish_reason=reason, input_token_len=len(req.seq.prompt_ids),
                            generate_token_len=len(req.seq.output_ids), error=error, request_id=request_id)

    def fail_all(self, error: str) -> list[StreamOutput]:
        """After an exception inside a step: end every request with finish_reason 'error'."""
        return [o for rid in list(self.requests) if (o := self.abort(rid, "error", error)) is not None]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------------------------
    def step(self) -> list[StreamOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return self._unschedulable()
        logits = self.runner.run(scheduled)
        for index, rows in self.runner.prompt_logits.items():
            self._collect_prompt_logprobs(scheduled[index].seq, rows)
        done = [item.seq for item in scheduled if item.completes]
        reqs = [self.requests[s.request_id] for s in done]
        tokens, logprobs = sample(logits, [SampleRequest(s.gen_config, s.prompt_ids, s.output_ids, sorted(s.stop_ids),
                                                         s.generator, r.guide) for s, r in zip(done, reqs)])
        sampled, failed = {}, {}
        for seq, req, token in zip(done, reqs, tokens):
            if isinstance(token, SamplingFailed):
                failed[seq.request_id] = str(token)
            elif req.guide is not None and not req.guide.accept(token):
                failed[seq.request_id] = f"token {token} is not allowed by the request's grammar"
            else:
                sampled[seq.request_id] = token
        logprobs_by_id = {s.request_id: lp for s, lp in zip(done, logprobs)}
        outputs = [self._output(u, logprobs_by_id[u.seq.request_id])
                   for u in self.scheduler.update_from_output(scheduled, sampled)]
        for request_id, error in failed.items():
            if (out := self.abort(request_id, "error", error)) is not None:
                outputs.append(out)
        return outputs

    @staticmethod
    def _collect_prompt_logprobs(seq: Sequence, rows: torch.Tensor) -> None:
        """Logprobs of the prompt tokens these logits predict (raw model distribution, like the output's)."""
        k = seq.gen_config.prompt_logprobs or 0
        first = len(seq.prompt_logprobs) + 1
        for j, row in enumerate(rows):
            seq.prompt_logprobs.append(token_logprobs(row, seq.prompt_ids[first + j], k))

    def _unschedulable(self) -> list[StreamOutput]:
        """Nothing fits although work is waiting (cannot happen with a consistent config): fail the head request."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        out = self.abort(seq.request_id, "error", f"request needs more KV blocks than the cache has "
                                                  f"({self.block_manager.num_blocks})")
        return [out] if out else []

    def _output(self, update: TokenUpdate, logprobs: Optional[dict[int, float]]) -> StreamOutput:
        """The stream output of one token the scheduler took (or a stop token that ended the sequence); stop
        strings (in the text) and a completed grammar end the request here."""
        seq = update.seq
        req = self.requests[seq.request_id]
        out = StreamOutput()
        if update.token is not None:
            self.tokens_generated += 1
            out = StreamOutput(text=req.text.add([update.token]), token_ids=[update.token],
                               logprobs=None if logprobs is None else [logprobs])
        reason = update.finish_reason
        if reason != "stop" and (req.text.stopped or (req.guide is not None and req.guide.finished)):
            if reason is None:
                self.scheduler.finish(seq, "stop")
            reason = seq.finish_reason = "stop"
        if reason is not None:
            out.text += req.text.finish(cut=reason == "length")
            out.finish_reason = reason
            self.requests.pop(seq.request_id, None)
        return self._fill(out, seq)

    @staticmethod
    def _fill(out: StreamOutput, seq: Sequence) -> StreamOutput:
        if seq.gen_config.prompt_logprobs is not None and len(seq.output_ids) <= 1:  # the request's first output
            out.prompt_logprobs = list(seq.prompt_logprobs)
        out.request_id = seq.request_id
        out.input_token_len = len(seq.prompt_ids)
        out.generate_token_len = len(seq.output_ids)
        return out

    # ---- introspection --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "blocks_total": bm.num_blocks, "blocks_used": bm.num_blocks - bm.num_free, "blocks_free": bm.num_free,
            "block_size": bm.block_size, "kv_cache_bytes": self.cache.nbytes(),
            "prefix_cache_queries": bm.stats.queries, "prefix_cache_hits": bm.stats.hits,
            "prefix_cache_hit_tokens": bm.stats.hit_tokens, "prefix_cache_query_tokens": bm.stats.query_tokens,
            "preemptions": self.scheduler.num_preemptions, "tokens_generated": self.tokens_generated,
            "session_len": self.session_len, "quant_policy": self.config.quant_policy,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
        }
