"""LoRA overhead: the cost of one engine step when its batch runs 0, 1 or 4 LoRA adapters.

The model is InternLM2-shaped with random weights (`puyu.tiny.build_checkpoint`, `--hidden`/`--layers`); the
adapters are random PEFT adapters on every linear (`puyu.tiny_lora.build_peft_adapter`, rank `--rank`), loaded as
the engine loads them. One batch of `--batch` sequences of `--context` tokens is prefilled once; then the same
decode step (one token per sequence) and the same prefill step are timed `--repeats` times each, with the batch's
rows on: no adapter (0), one adapter for every sequence (1), or the sequences split evenly over 4 adapters (4),
the three batches timed round-robin. The median step time is reported, and the overhead against 0 adapters.

    .venv/bin/python benchmarks/lora_overhead.py                          # cpu defaults (about a minute)
    .venv/bin/python benchmarks/lora_overhead.py --device cuda --batch 64 --hidden 1024 --layers 8
Writes benchmarks/results/lora_overhead_<device>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ADAPTER_COUNTS = (0, 1, 4)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--kernels", default="auto", choices=("auto", "torch"))
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    return p.parse_args()


def build_model(args: argparse.Namespace, work: Path):
    """The tiny model with its 4 adapters loaded, its cache, block manager and runner."""
    from puyu.convert import load_model_weights
    from puyu.engine.block_manager import BlockManager
    from puyu.engine.kv_cache import KVCacheStorage
    from puyu.engine.model import DecoderModel
    from puyu.engine.model_runner import ModelRunner
    from puyu.engine.peft_adapter import load_peft_adapter
    from puyu.tiny import TinyShape, build_checkpoint
    from puyu.tiny_lora import build_peft_adapter

    shape = TinyShape(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), intermediate_size=args.hidden * 11 // 4)
    ckpt = build_checkpoint(work / "model", "internlm2", torch.float32, shape, seed=0)
    targets = ["wqkv", "wo", "w1", "w2", "w3"]
    device = torch.device(args.device)
    spec, weights = load_model_weights(ckpt, torch.float32)
    model = DecoderModel(spec, {k: v.to(device) for k, v in weights.items()}, device, args.kernels)
    for i in range(max(ADAPTER_COUNTS)):
        path = build_peft_adapter(ckpt, work / f"adapter{i}", targets, r=args.rank, alpha=2 * args.rank, seed=i)
        model.lora.add(f"a{i}", load_peft_adapter(path, spec, torch.float32, device))
    blocks = len(ADAPTER_COUNTS) * args.batch * (-(-(args.context + 1) // 16) + 1)
    cache = KVCacheStorage(spec.num_layers, blocks, 16, spec.num_kv_heads, spec.head_dim, torch.float32, device)
    return spec, ModelRunner(model, cache), BlockManager(blocks, 16)


def median_times(steps: dict[int, Callable[[], Any]], repeats: int, device: str) -> dict[int, float]:
    """Median seconds of each step over `repeats` rounds, after one warm-up round. The steps run round-robin (one
    of each per round), so a slow spell of a shared machine falls on all of them alike."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[int, list[float]] = {k: [] for k in steps}
    for round_ in range(repeats + 1):
        for k, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if round_:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from puyu.config import GenerationConfig
    from puyu.engine.sequence import ScheduledSeq, Sequence

    with tempfile.TemporaryDirectory() as tmp:
        spec, runner, bm = build_model(args, Path(tmp))
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, spec.vocab_size - 8, (args.batch, args.context + 1), generator=gen).tolist()
        prefill: dict[int, list[ScheduledSeq]] = {}
        decode: dict[int, list[ScheduledSeq]] = {}
        for count in ADAPTER_COUNTS:  # one batch per adapter count, each in its own blocks
            seqs = [Sequence(f"{count}-{i}", p, GenerationConfig(adapter_name=f"a{i % count}" if count else None))
                    for i, p in enumerate(prompts)]
            for s in seqs:
                assert bm.allocate(s, len(s))
            prefill[count] = [ScheduledSeq(s, 0, len(s) - 1) for s in seqs]
            decode[count] = [ScheduledSeq(s, len(s) - 1, 1) for s in seqs]
            runner.run(prefill[count])
        dec = median_times({c: (lambda c=c: runner.run(decode[c])) for c in ADAPTER_COUNTS}, args.repeats,
                           args.device)
        pre = median_times({c: (lambda c=c: runner.run(prefill[c])) for c in ADAPTER_COUNTS},
                           max(1, args.repeats // 3), args.device)
    rows = [{"adapters": c, "decode_step_ms": 1e3 * dec[c], "prefill_step_ms": 1e3 * pre[c],
             "decode_overhead": dec[c] / dec[0] - 1, "prefill_overhead": pre[c] / pre[0] - 1}
            for c in ADAPTER_COUNTS]
    return {"config": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "results": rows}


def main() -> None:
    args = parse_args()
    report = run(args)
    print(f"{'adapters':>8} {'decode ms':>10} {'overhead':>9} {'prefill ms':>11} {'overhead':>9}")
    for r in report["results"]:
        print(f"{r['adapters']:>8} {r['decode_step_ms']:>10.2f} {r['decode_overhead']:>+9.1%} "
              f"{r['prefill_step_ms']:>11.2f} {r['prefill_overhead']:>+9.1%}")
    out = args.out or RESULTS / f"lora_overhead_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
