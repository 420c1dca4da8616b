"""Benchmark harness (`puyu bench serve|engine|latency|compare`); metric definitions in
../shared/spec/bench-metrics.md, printed with every report.

records.py (per-request timestamps) -> metrics.py / stats.py (formulas, percentiles) -> report.py / plots.py /
results.py (console table, JSON, JSONL, PNG). Inputs: datasets.py (random, sharegpt, shared-prefix, jsonl) with
tokenizer.py; load.py (arrivals, concurrency limit, sweeps); runner.py (warm-up + measured run) driving either
client.py (any OpenAI-compatible server) or engine_bench.py (in-process AsyncEngine); latency.py; compare.py.
"""
