"""Engine throughput: the same offline workload through puyu's engine and three ways of running transformers.

Workload: N requests of `--input-len` random token ids each, all arriving at t=0, `--output-len` new tokens each
(greedy, ignore_eos). Backends:
  puyu       puyu's engine (AsyncEngine, paged KV, continuous batching), once per `--quant-policies` value
  hf_seq     transformers `generate`, one request at a time (how the InternLM2-Chat tutorials run it)
  hf_static  transformers `generate` on one static padded batch of all N requests
  hf_cb      transformers' continuous batching, `model.generate_batch(...)`
The model is InternLM2-shaped with random weights (`puyu.tiny.build_checkpoint`, ~105M parameters by default),
mapped onto `LlamaForCausalLM` for transformers (`puyu.convert.reference.load_reference_model`).

Each (backend, N) runs in its own subprocess so that peak RSS is that run's alone. Model loading and a short warm-up
are outside the timed part. TTFT counts from t=0 (when all requests arrive), so it includes queueing: for hf_seq the
k-th request waits for the k-1 before it. hf_seq runs only `--seq-requests` requests (default 2 on cpu), once, and
is reused for every N, since its speed does not depend on N; its TTFT for a queue of N is extrapolated as
k * (time per request) + (first request's TTFT) (marked `ttft_extrapolated`).

    .venv/bin/python benchmarks/engine_throughput.py                      # cpu defaults (~10 minutes on 2 cores)
    .venv/bin/python benchmarks/engine_throughput.py --device cuda --requests 16,64,256 --seq-requests 16
Writes benchmarks/results/engine_<device>.json (and a .png with --plot) and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = ("puyu", "hf_seq", "hf_static", "hf_cb")


# ---- configuration ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    num_requests: int
    input_len: int
    output_len: int
    seed: int = 0

    def prompts(self, vocab_low: int, vocab_high: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(vocab_low, vocab_high, (self.num_requests, self.input_len), generator=gen)
        return ids.tolist()


@dataclass
class RunSpec:
    backend: str
    workload: Workload
    model_dir: str
    device: str
    dtype: str
    threads: int
    quant_policy: int = 0
    block_size: int = 64
    queue: int = 0  # requests the workload stands for (hf_seq measures fewer and extrapolates TTFT)


@dataclass
class RunResult:
    backend: str
    label: str
    num_requests: int
    input_len: int
    output_len: int
    elapsed_s: float
    req_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float
    ttft_s: dict[str, float]
    ttft_extrapolated: bool
    peak_rss_mib: float
    rss_after_load_mib: float
    kv_bytes: dict[str, Any]
    cuda_peak_mib: Optional[float] = None
    generated_tokens: int = 0
    first_request_tokens: list[int] = field(default_factory=list)
    first_token_s: float = 0.0  # TTFT of the first request measured
    quant_policy: Optional[int] = None


def _rss_mib() -> float:
    """Current RSS of this process (from /proc), MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _ttft_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- shared model facts --------------------------------------------------------------------------------------
def _model_shape(model_dir: str) -> dict[str, int]:
    from puyu.convert.spec import read_model_spec

    spec = read_model_spec(Path(model_dir))
    return {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "vocab": spec.vocab_size}


def _dense_kv_bytes(shape: dict[str, int], tokens: int, dtype: torch.dtype) -> int:
    """K+V bytes of a dense (transformers DynamicCache) cache holding `tokens` tokens."""
    esize = torch.empty((), dtype=dtype).element_size()
    return 2 * shape["layers"] * tokens * shape["kv_heads"] * shape["head_dim"] * esize


# ---- backends (each runs inside the worker subprocess) -------------------------------------------------------
def _load_hf(spec: RunSpec):
    from puyu.convert.reference import load_reference_model

    model = load_reference_model(spec.model_dir, getattr(torch, spec.dtype), spec.device)
    model.config._attn_implementation = "sdpa"
    return model


def _hf_generation_config(max_new_tokens: int):
    from transformers import GenerationConfig

    # eos -1: no token stops generation early (ignore_eos). No min_new_tokens: with eos -1 its processor would mask
    # the last vocabulary entry and change the greedy tokens.
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=2)


class _FirstStepClock:
    """A logits processor that records when the first new token of a `generate` call is chosen."""

    def __init__(self, device: str):
        self.device = device
        self.first: Optional[float] = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()
        return scores


def _hf_generate(model, prompts: list[list[int]], max_new: int, device: str) -> tuple[torch.Tensor, float]:
    """One `generate` call on a batch of equal-length prompts; returns (new tokens, time of the first token)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts, device=device)
    clock = _FirstStepClock(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_hf_generation_config(max_new),
                         logits_processor=LogitsProcessorList([clock]))
    _sync(device)
    return out[:, ids.shape[1]:].cpu(), clock.first or time.perf_counter()


def run_hf_seq(spec: RunSpec, prompts: list[list[int]]) -> dict[str, Any]:
    model = _load_hf(spec)
    _hf_generate(model, prompts[:1], 4, spec.device)  # warm-up
    rss_load = _rss_mib()
    t0 = time.perf_counter()
    ttft, outs = [], []
    for p in prompts:
        new, first = _hf_generate(model, [p], spec.workload.output_len, spec.device)
        ttft.append(first - t0)
        outs.append(new[0].tolist())
    elapsed = time.perf_counter() - t0
    return {"elapsed": elapsed, "ttft": ttft, "outputs": outs, "rss_load": rss_load}


def run_hf_static(spec: RunSpec, prompts: list[list[int]]) -> dict[str, Any]:
    model = _load_hf(spec)
    _hf_generate(model, prompts[:2], 4, spec.device)
    rss_load = _rss_mib()
    t0 = time.perf_counter()
    new, first = _hf_generate(model, prompts, spec.workload.output_len, spec.device)
    elapsed = time.perf_counter() - t0
    return {"elapsed": elapsed, "ttft": [first - t0] * len(prompts), "outputs": new.tolist(), "rss_load": rss_load}


def _generate_batch(model, prompts: list[list[int]], max_new: int, pages: int, page_size: int, timestamps: bool):
    """`model.generate_batch` with a cache sized for the workload; arguments an older transformers lacks are left out."""
    import inspect

    kwargs: dict[str, Any] = {"generation_config": _hf_generation_config(max_new)}
    params = inspect.signature(model.generate_batch).parameters
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if "continuous_batching_config" in params:
            known = inspect.signature(ContinuousBatchingConfig).parameters  # field names differ between versions
            wanted = {"page_size": page_size, "block_size": page_size, "num_blocks": pages, "max_batch_tokens": 2048}
            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
                **{k: v for k, v in wanted.items() if k in known})
    except ImportError:
        pass
    if timestamps and "record_timestamps" in params:
        kwargs["record_timestamps"] = True
    return model.generate_batch(prompts, **kwargs)


def run_hf_cb(spec: RunSpec, prompts: list[list[int]]) -> dict[str, Any]:
    model = _load_hf(spec)
    w = spec.workload
    per_req = math.ceil((w.input_len + w.output_len) / spec.block_size)
    _generate_batch(model, prompts[:2], 4, 2 * per_req + 1, spec.block_size, False)  # warm-up
    rss_load = _rss_mib()
    t0 = time.perf_counter()
    res = _generate_batch(model, prompts, w.output_len, len(prompts) * per_req + 1, spec.block_size, True)
    _sync(spec.device)
    elapsed = time.perf_counter() - t0
    ordered = list(res.values())
    errors = [r.error for r in ordered if r.error]
    if errors or len(ordered) != len(prompts):
        raise RuntimeError(f"generate_batch failed: {len(ordered)}/{len(prompts)} results, errors {errors[:2]}")
    ttft = [r.timestamps[0] - t0 for r in ordered if getattr(r, "timestamps", None)]
    return {"elapsed": elapsed, "ttft": ttft, "outputs": [list(r.generated_tokens) for r in ordered],
            "rss_load": rss_load}


def _engine(spec: RunSpec, num_requests: int):
    from puyu.config import EngineConfig
    from puyu.engine import AsyncEngine

    w = spec.workload
    blocks = num_requests * math.ceil((w.input_len + w.output_len) / spec.block_size) + 8
    config = EngineConfig(quant_policy=spec.quant_policy, cache_block_seq_len=spec.block_size,
                          cache_max_entry_count=blocks, max_batch_size=max(num_requests, 1),
                          enable_prefix_caching=False, device=spec.device, dtype=spec.dtype)
    return AsyncEngine(spec.model_dir, config), blocks


async def _puyu_requests(engine, prompts: list[list[int]], max_new: int, t0: float, on_step: Callable[[], None]):
    from puyu.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> tuple[float, list[int]]:
        first, tokens = None, []
        async for out in engine.generate(prompt, gen, request_id=f"bench-{i}"):
            if out.token_ids and first is None:
                first = time.perf_counter() - t0
            tokens.extend(out.token_ids)
            if i == 0:
                on_step()
            if out.finish_reason is not None and out.finish_reason not in ("length", "stop"):
                raise RuntimeError(f"request {i} finished with {out.finish_reason}: {out.error}")
        return first if first is not None else float("nan"), tokens

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def run_puyu(spec: RunSpec, prompts: list[list[int]]) -> dict[str, Any]:
    engine, blocks = _engine(spec, len(prompts))
    peak_used = [0]

    def sample_blocks() -> None:
        peak_used[0] = max(peak_used[0], int(engine.stats().get("blocks_used", 0)))

    asyncio.run(_puyu_requests(engine, prompts[:2], 4, time.perf_counter(), lambda: None))  # warm-up
    rss_load = _rss_mib()
    t0 = time.perf_counter()
    results = asyncio.run(_puyu_requests(engine, prompts, spec.workload.output_len, t0, sample_blocks))
    _sync(spec.device)
    elapsed = time.perf_counter() - t0
    return {"elapsed": elapsed, "ttft": [r[0] for r in results], "outputs": [r[1] for r in results],
            "rss_load": rss_load, "blocks": blocks, "peak_blocks_used": peak_used[0]}


RUNNERS = {"puyu": run_puyu, "hf_seq": run_hf_seq, "hf_static": run_hf_static, "hf_cb": run_hf_cb}


def _kv_figures(spec: RunSpec, raw: dict[str, Any], n_done: int) -> dict[str, Any]:
    from puyu.engine.kv_cache import KVCacheStorage

    shape = _model_shape(spec.model_dir)
    dtype = getattr(torch, spec.dtype)
    w = spec.workload
    if spec.backend == "puyu":
        per_block = KVCacheStorage.bytes_per_block(shape["layers"], spec.block_size, shape["kv_heads"],
                                                   shape["head_dim"], dtype, spec.quant_policy)
        return {"kind": f"paged, quant_policy {spec.quant_policy}", "bytes_per_block": per_block,
                "allocated": per_block * raw["blocks"], "peak_in_use": per_block * raw["peak_blocks_used"],
                "per_token": per_block // spec.block_size}
    at_once = 1 if spec.backend == "hf_seq" else n_done
    return {"kind": "dense" if spec.backend != "hf_cb" else "paged (transformers)",
            "per_token": _dense_kv_bytes(shape, 1, dtype),
            "peak_in_use": _dense_kv_bytes(shape, at_once * (w.input_len + w.output_len), dtype)}


def queued_ttft(per_request_s: float, first_token_s: float, queue: int) -> list[float]:
    """TTFT of each of `queue` requests served one at a time: request k waits for the k before it."""
    return [k * per_request_s + first_token_s for k in range(queue)]


def worker(spec: RunSpec) -> RunResult:
    torch.set_num_threads(spec.threads)
    shape = _model_shape(spec.model_dir)
    prompts = spec.workload.prompts(10, shape["vocab"] - 16)  # plain tokens: no special or protocol ids
    if spec.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    raw = RUNNERS[spec.backend](spec, prompts)
    n = len(raw["outputs"])
    gen_tokens = sum(len(o) for o in raw["outputs"])
    if gen_tokens != n * spec.workload.output_len:
        raise RuntimeError(f"{spec.backend}: generated {gen_tokens} tokens, expected {n * spec.workload.output_len}")
    elapsed = raw["elapsed"]
    ttft, extrapolated = raw["ttft"], False
    if spec.backend == "hf_seq" and n < spec.queue:
        ttft, extrapolated = queued_ttft(elapsed / n, ttft[0], spec.queue), True
    label = spec.backend + (f" qp{spec.quant_policy}" if spec.backend == "puyu" else "")
    return RunResult(
        backend=spec.backend, label=label, num_requests=spec.queue, input_len=spec.workload.input_len,
        output_len=spec.workload.output_len, elapsed_s=elapsed, req_per_s=n / elapsed,
        output_tok_per_s=gen_tokens / elapsed, total_tok_per_s=(gen_tokens + n * spec.workload.input_len) / elapsed,
        ttft_s=_ttft_summary(ttft), ttft_extrapolated=extrapolated, peak_rss_mib=_peak_rss_mib(),
        rss_after_load_mib=raw["rss_load"], kv_bytes=_kv_figures(spec, raw, n),
        cuda_peak_mib=(torch.cuda.max_memory_allocated() / 2**20) if spec.device.startswith("cuda") else None,
        generated_tokens=gen_tokens, first_request_tokens=raw["outputs"][0][:32], first_token_s=raw["ttft"][0],
        quant_policy=spec.quant_policy if spec.backend == "puyu" else None)


# ---- orchestration --------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> Path:
    from puyu.tiny import TinyShape, build_checkpoint, cache_root

    shape = TinyShape(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, max_position_embeddings=4096)
    name = f"bench-internlm2-h{args.hidden}-l{args.layers}-a{args.heads}-kv{args.kv_heads}-f{args.ffn}"
    out = cache_root() / "models" / name
    if not (out / "puyu_tiny.json").exists():
        build_checkpoint(out, "internlm2", torch.bfloat16, shape, seed=1234, num_shards=2)
    return out


def count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def run_in_subprocess(spec: RunSpec, timeout: float) -> dict[str, Any]:
    """Run one (backend, N) in a fresh interpreter; returns its RunResult as a dict, or {'error': ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def plan(args: argparse.Namespace, model_dir: Path) -> list[RunSpec]:
    """Every (N, backend, quant_policy) to run; hf_seq runs at most --seq-requests of the N requests."""
    specs = []
    for n in args.requests:
        for backend in args.backends:
            for qp in (args.quant_policies if backend == "puyu" else [0]):
                if backend == "puyu" and qp != 0 and n not in args.quant_requests:
                    continue
                count = min(n, args.seq_requests) if backend == "hf_seq" else n
                wl = Workload(count, args.input_len, args.output_len, seed=args.seed)
                specs.append(RunSpec(backend, wl, str(model_dir), args.device, args.dtype, args.threads, qp,
                                     args.block_size, queue=n))
    return specs


def requeue(row: dict[str, Any], queue: int) -> dict[str, Any]:
    """An hf_seq result for another queue length: same speed, TTFT extrapolated for `queue` requests."""
    per_request = row["elapsed_s"] / row["measured_requests"]
    out = dict(row, num_requests=queue, ttft_extrapolated=True, reused_from_n=row["num_requests"])
    out["ttft_s"] = _ttft_summary(queued_ttft(per_request, row["first_token_s"], queue))
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'run':<14}{'N':>5}{'req/s':>9}{'out tok/s':>11}{'TTFT mean':>11}{'p50':>9}{'p99':>9}" \
           f"{'peak RSS MiB':>14}{'KV MiB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<14}{r['num_requests']:>5}  ERROR {r['error']}")
            continue
        t = r["ttft_s"]
        star = "*" if r["ttft_extrapolated"] else " "
        print(f"{r['label']:<14}{r['num_requests']:>5}{r['req_per_s']:>9.3f}{r['output_tok_per_s']:>11.1f}"
              f"{t.get('mean', float('nan')):>10.2f}{star}{t.get('p50', float('nan')):>9.2f}"
              f"{t.get('p99', float('nan')):>9.2f}{r['peak_rss_mib']:>14.0f}"
              f"{r['kv_bytes']['peak_in_use'] / 2**20:>9.1f}")
    print("TTFT in seconds from t=0 (all requests arrive at once); * extrapolated from the measured requests.")


def agreement(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Share of the first request's first 32 tokens that each run shares with hf_seq (same weights, greedy)."""
    ref = next((r["first_request_tokens"] for r in rows if r.get("backend") == "hf_seq"), None)
    if not ref:
        return {}
    out = {}
    for r in rows:
        if "first_request_tokens" in r:
            toks = r["first_request_tokens"]
            out[f"{r['label']} N={r['num_requests']}"] = sum(a == b for a, b in zip(toks, ref)) / len(ref)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda by default")
    p.add_argument("--requests", type=ints, default=[16, 64], help="comma-separated request counts")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    p.add_argument("--quant-policies", type=ints, default=[0, 8, 4])
    p.add_argument("--quant-requests", type=ints, default=None,
                   help="request counts at which quant_policy 8/4 also run (default: the first of --requests)")
    p.add_argument("--seq-requests", type=int, default=None,
                   help="requests hf_seq really runs (default: 2 on cpu, all on cuda)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", action="store_true", help="also write a .png bar chart next to the JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        p.error(f"--backends: unknown {bad}; known: {', '.join(BACKENDS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.quant_requests = args.quant_requests or args.requests[:1]
    if args.seq_requests is None:
        args.seq_requests = 2 if args.device == "cpu" else max(args.requests)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        d = json.loads(args.worker)
        d["workload"] = Workload(**d["workload"])
        print(json.dumps(asdict(worker(RunSpec(**d)))))
        return 0
    model_dir = build_model(args)
    n_params = count_params(model_dir)
    print(f"model {model_dir.name}: {n_params / 1e6:.1f}M parameters; device {args.device}, dtype {args.dtype}, "
          f"{args.threads} threads", flush=True)
    rows, load_before = [], os.getloadavg()
    seq_done: dict[int, dict[str, Any]] = {}  # hf_seq's speed does not depend on N: measure once per count
    for spec in plan(args, model_dir):
        t = time.perf_counter()
        reuse = seq_done.get(spec.workload.num_requests) if spec.backend == "hf_seq" else None
        row = requeue(reuse, spec.queue) if reuse else run_in_subprocess(spec, args.timeout)
        if "error" in row:
            row.update(label=spec.backend + (f" qp{spec.quant_policy}" if spec.backend == "puyu" else ""),
                       backend=spec.backend, num_requests=spec.queue)
        elif spec.backend == "hf_seq":
            seq_done[spec.workload.num_requests] = row
        row["measured_requests"] = spec.workload.num_requests
        rows.append(row)
        print(f"  {row['label']:<12} N={spec.queue:<4} done in {time.perf_counter() - t:.0f} s"
              + (f"  ERROR {row['error']}" if "error" in row else f"  {row['output_tok_per_s']:.1f} out tok/s")
              + ("  (hf_seq figures reused, TTFT re-queued)" if reuse else ""), flush=True)
    print_table(rows)
    result = {"benchmark": "engine_throughput", "model": {"dir_name": model_dir.name, "parameters": n_params,
              "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
              "ffn": args.ffn}, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "workload": {"input_len": args.input_len, "output_len": args.output_len, "ignore_eos": True,
                           "greedy": True, "arrival": "all at t=0"},
              "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
              "token_agreement_with_hf_seq": agreement(rows), "runs": rows}
    out = args.out or RESULTS / f"engine_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.plot:
        plot(result, out.with_suffix(".png"))
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["runs"] if "error" not in r]
    labels = [f"{r['label']}\nN={r['num_requests']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.1), 4))
    axes[0].bar(labels, [r["output_tok_per_s"] for r in rows])
    axes[0].set_ylabel("output tokens / s")
    axes[1].bar(labels, [r["ttft_s"].get("mean", 0) for r in rows])
    axes[1].set_ylabel("mean TTFT (s, from t=0, log scale)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.suptitle(f"engine_throughput: {result['model']['parameters'] / 1e6:.0f}M params, {result['device']}, "
                 f"{result['workload']['input_len']} in / {result['workload']['output_len']} out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
