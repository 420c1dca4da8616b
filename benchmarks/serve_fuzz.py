"""OpenAPI fuzzing of `puyu serve` with schemathesis: how many requests get a 5xx answer (the goal is zero).

A real server (uvicorn on 127.0.0.1, a free port) runs the native engine on a tiny InternLM2 checkpoint built offline
(`puyu.tiny.build_checkpoint`; session_len 128 bounds each generation). Every operation of /openapi.json gets
`--examples` generated requests, valid and schema-violating ones; half of the bodies name the served model so that
generation runs. `--api-key` also turns authentication on.

    .venv/bin/python benchmarks/serve_fuzz.py --examples 400
Writes benchmarks/results/serve_fuzz.json and prints the status counts and the number of 5xx answers.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="generated requests per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_fuzz.json")
    args = parser.parse_args()

    import uvicorn

    from puyu.config import EngineConfig
    from puyu.engine import AsyncEngine
    from puyu.serve.api_server import create_app
    from puyu.serve.fuzz import fuzz
    from puyu.tiny import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp) / "tiny-internlm2")
        engine = AsyncEngine(model_dir, EngineConfig(session_len=128, cache_max_entry_count=1024,
                                                     cache_block_seq_len=16, max_batch_size=64))
        server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", [args.api_key] if args.api_key else ()),
                                               host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            report = fuzz(f"http://127.0.0.1:{port}", "tiny", args.examples, args.api_key, args.seed)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            engine.close()
    result = {**report.to_dict(), "seed": args.seed, "api_key": bool(args.api_key),
              "command": "python benchmarks/serve_fuzz.py " + " ".join(sys.argv[1:]),
              "python": platform.python_version(), "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{report.calls} requests in {report.seconds} s; by status: {report.by_status}; 5xx: {report.num_5xx}")
    for err in report.server_errors:
        print(f"5xx on {err['operation']}: {err['body'][:200]}\n  {err['curl']}")
    return 1 if report.num_5xx else 0


if __name__ == "__main__":
    sys.exit(main())
