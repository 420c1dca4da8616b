"""Benchmark prompts: random (token-exact), ShareGPT-format files, shared-prefix groups, and JSONL.

Every sample carries its prompt length counted with the target's tokenizer, so reported input tokens are measured,
not assumed. Range ratios state their mode: vLLM samples lengths in [L(1-r), L(1+r)], SGLang/LMDeploy in [L·r, L].
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .report import read_json

RANGE_MODES = ("vllm", "sglang")
DATASETS = ("random", "sharegpt", "shared-prefix", "jsonl")
# ShareGPT filter (LMDeploy / vLLM): prompts of 4..1024 tokens, prompt + output <= 2048, outputs of >= 4 tokens.
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class DatasetConfig:
    name: str = "random"
    path: Optional[str] = None
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    range_mode: str = "vllm"
    output_range_ratio: Optional[float] = None  # None: the same as range_ratio (vLLM, SGLang); 0 fixes outputs
    seed: int = 0
    prefix_len: int = 512  # shared-prefix: tokens of the common system prefix
    num_groups: int = 4  # shared-prefix: number of distinct prefixes

    def validate(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"--dataset: must be one of {', '.join(DATASETS)}, got {self.name!r}")
        if self.name in ("sharegpt", "jsonl") and not self.path:
            raise ValueError(f"--dataset-path is required for --dataset {self.name}")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"--input-len and --output-len must be >= 1, got {self.input_len}, {self.output_len}")
        if self.range_mode not in RANGE_MODES:
            raise ValueError(f"--range-mode: must be vllm or sglang, got {self.range_mode!r}")
        if self.range_mode == "vllm" and not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1) with --range-mode vllm, got {self.range_ratio}")
        if self.range_mode == "sglang" and not 0 < self.range_ratio <= 1:
            raise ValueError(f"--range-ratio must be in (0, 1] with --range-mode sglang, got {self.range_ratio}")
        if self.output_range_ratio is not None and not 0 <= self.output_range_ratio <= 1:
            raise ValueError(f"--output-range-ratio must be in [0, 1], got {self.output_range_ratio}")


def length_bounds(length: int, ratio: float, mode: str) -> tuple[int, int]:
    """Inclusive bounds of sampled lengths: vllm [⌊L(1-r)⌋, ⌈L(1+r)⌉], sglang [max(1, ⌊L·r⌋), L]."""
    if mode == "vllm":
        return max(1, math.floor(length * (1 - ratio))), max(1, math.ceil(length * (1 + ratio)))
    if mode == "sglang":
        return max(1, math.floor(length * ratio)), length
    raise ValueError(f"--range-mode: must be vllm or sglang, got {mode!r}")


def _normal_token_ids(tokenizer: Any) -> list[int]:
    """Non-special ids whose text re-encodes to themselves (no partial UTF-8 bytes), so random prompts converge."""
    key = id(tokenizer)
    if key not in _VOCAB_CACHE and hasattr(tokenizer, "normal_token_ids"):  # a server's tokenizer (bench/tokenizer)
        _VOCAB_CACHE[key] = tokenizer.normal_token_ids()
    if key not in _VOCAB_CACHE:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        ids = [i for i in range(len(tokenizer)) if i not in special]
        stable = [i for i in ids if tokenizer.encode(tokenizer.decode([i]), add_special_tokens=False) == [i]]
        _VOCAB_CACHE[key] = stable or ids
    return _VOCAB_CACHE[key]


_VOCAB_CACHE: dict[int, list[int]] = {}


def exact_prompt(tokenizer: Any, n: int, rng: random.Random, vocab: list[int]) -> tuple[str, int]:
    """Text that re-encodes to exactly n tokens: draw ids, decode, re-encode, cut or pad, repeat (new draws
    after 10 rounds). Returns (text, its measured token count); the count is n unless 5 draws did not converge."""
    text, count = "", 0
    for _ in range(5):
        ids = [rng.choice(vocab) for _ in range(n)]
        text = tokenizer.decode(ids)
        for _ in range(10):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == n:
                return text, n
            ids = ids[:n] if len(ids) > n else ids + [rng.choice(vocab) for _ in range(n - len(ids))]
            text = tokenizer.decode(ids)
        count = len(tokenizer.encode(text, add_special_tokens=False))
        if count == n:
            return text, n
    return text, count


def random_dataset(cfg: DatasetConfig, tokenizer: Any) -> list[SampleRequest]:
    rng = random.Random(cfg.seed)
    vocab = _normal_token_ids(tokenizer)
    in_lo, in_hi = length_bounds(cfg.input_len, cfg.range_ratio, cfg.range_mode)
    out_ratio = cfg.range_ratio if cfg.output_range_ratio is None else cfg.output_range_ratio
    if out_ratio == 0:
        out_lo = out_hi = cfg.output_len
    else:
        out_lo, out_hi = length_bounds(cfg.output_len, out_ratio, cfg.range_mode)
    samples = []
    for _ in range(cfg.num_prompts):
        text, n = exact_prompt(tokenizer, rng.randint(in_lo, in_hi), rng, vocab)
        samples.append(SampleRequest(text, n, rng.randint(out_lo, out_hi)))
    return samples


def shared_prefix_dataset(cfg: DatasetConfig, tokenizer: Any) -> list[SampleRequest]:
    """`num_groups` system prefixes of `prefix_len` tokens, each followed by distinct questions of `input_len`."""
    rng = random.Random(cfg.seed)
    vocab = _normal_token_ids(tokenizer)
    prefixes = [exact_prompt(tokenizer, cfg.prefix_len, rng, vocab)[0] for _ in range(cfg.num_groups)]
    samples = []
    for i in range(cfg.num_prompts):
        question, _ = exact_prompt(tokenizer, cfg.input_len, rng, vocab)
        prompt = prefixes[i % cfg.num_groups] + "\n" + question
        samples.append(SampleRequest(prompt, len(tokenizer.encode(prompt, add_special_tokens=False)), cfg.output_len))
    return samples


def sharegpt_dataset(cfg: DatasetConfig, tokenizer: Any, fixed_output_len: Optional[int] = None) -> list[SampleRequest]:
    """Turn 0 is the prompt, turn 1's token count the output length (unless fixed); LMDeploy's length filter."""
    path = Path(cfg.path or "")
    data = read_json(path, "--dataset-path")
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {path}: expected a JSON list of {{'conversations': [...]}} entries")
    convs = [d["conversations"] for d in data if isinstance(d, dict) and len(d.get("conversations") or []) >= 2]
    random.Random(cfg.seed).shuffle(convs)
    samples = []
    for conv in convs:
        try:
            prompt, reply = str(conv[0]["value"]), str(conv[1]["value"])
        except (KeyError, TypeError):
            raise ValueError(f"--dataset-path {path}: each conversation turn needs a 'value'") from None
        p_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        o_len = fixed_output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if p_len < SHAREGPT_MIN_LEN or o_len < SHAREGPT_MIN_LEN:
            continue
        if p_len > SHAREGPT_MAX_PROMPT or p_len + o_len > SHAREGPT_MAX_TOTAL:
            continue
        samples.append(SampleRequest(prompt, p_len, o_len))
        if len(samples) == cfg.num_prompts:
            break
    if not samples:
        raise ValueError(f"--dataset-path {path}: no conversation passed the length filter")
    return samples


def jsonl_dataset(cfg: DatasetConfig, tokenizer: Any) -> list[SampleRequest]:
    """One JSON object per line: {"prompt": str, "output_len": int (optional, default --output-len)}."""
    path = Path(cfg.path or "")
    if not path.is_file():
        raise FileNotFoundError(f"--dataset-path {path}: no such file")
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"--dataset-path {path}:{lineno}: expected a JSON object with a 'prompt'") from None
        if not isinstance(prompt, str):
            raise ValueError(f"--dataset-path {path}:{lineno}: 'prompt' must be a string")
        out_len = int(row.get("output_len", cfg.output_len))
        samples.append(SampleRequest(prompt, len(tokenizer.encode(prompt, add_special_tokens=False)), out_len))
        if len(samples) == cfg.num_prompts:
            break
    if not samples:
        raise ValueError(f"--dataset-path {path}: no prompts")
    return samples


def load_dataset(cfg: DatasetConfig, tokenizer: Any, fixed_output_len: Optional[int] = None) -> list[SampleRequest]:
    cfg.validate()
    if cfg.name == "random":
        return random_dataset(cfg, tokenizer)
    if cfg.name == "shared-prefix":
        return shared_prefix_dataset(cfg, tokenizer)
    if cfg.name == "sharegpt":
        return sharegpt_dataset(cfg, tokenizer, fixed_output_len)
    return jsonl_dataset(cfg, tokenizer)


_WORDS = ("model token cache batch latency throughput prompt reply python data city weather river mountain "
          "explain write summarize translate compare list why how what when the a of to and in for with").split()


def write_sharegpt_file(path: Path | str, num_conversations: int = 50, seed: int = 0) -> Path:
    """A small ShareGPT-format file of generated conversations (for tests; never a download)."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    data = [{"id": f"gen-{i}", "conversations": [{"from": "human", "value": sentence(5, 60)},
                                                  {"from": "gpt", "value": sentence(5, 80)}]}
            for i in range(num_conversations)]
    path = Path(path)
    path.write_text(json.dumps(data, indent=1))
    return path
