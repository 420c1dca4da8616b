"""OpenAPI-driven fuzzing of a running server with schemathesis (a test dependency): every operation of
/openapi.json gets generated requests, valid ones (positive mode) and schema-violating ones (negative mode); half of
the request bodies get the served model name so generation paths are reached, not only the 404. The report counts
answers by status; any 5xx is a bug."""
from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class FuzzReport:
    base_url: str
    max_examples: int
    calls: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    server_errors: list[dict[str, Any]] = field(default_factory=list)  # the first few 5xx, reproducible as curl
    by_operation: dict[str, int] = field(default_factory=dict)
    client_errors: dict[str, int] = field(default_factory=dict)  # 4xx by error code and param
    client_error_examples: dict[str, str] = field(default_factory=dict)  # one message per key
    seconds: float = 0.0

    @property
    def num_5xx(self) -> int:
        return sum(n for status, n in self.by_status.items() if status.startswith("5"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_5xx": self.num_5xx}


def fuzz(base_url: str, model: str, max_examples: int = 50, api_key: Optional[str] = None,
         seed: int = 0, keep_errors: int = 10) -> FuzzReport:
    """Fuzz every operation of the server at `base_url`; returns the counts (does not raise on 5xx)."""
    import schemathesis
    from hypothesis import HealthCheck, given, seed as hseed, settings, strategies as st
    from schemathesis import GenerationMode

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    schema = schemathesis.openapi.from_url(base_url.rstrip("/") + "/openapi.json", headers=headers or {})
    report = FuzzReport(base_url=base_url, max_examples=max_examples)
    statuses: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # puyu's own schema always loads
        label = f"{operation.method.upper()} {operation.path}"
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                             operation.as_strategy(GenerationMode.NEGATIVE))

        @hseed(seed)
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, use_model=st.booleans())
        def one(case: Any, use_model: bool) -> None:
            if use_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
            response = case.call(base_url=base_url, headers=headers, timeout=120)
            statuses[str(response.status_code)] += 1
            report.by_operation[label] = report.by_operation.get(label, 0) + 1  # noqa: B023 (one() runs in this iteration)
            if 400 <= response.status_code < 500:
                key = _error_key(response)
                report.client_errors[key] = report.client_errors.get(key, 0) + 1
                report.client_error_examples.setdefault(key, response.text[:300])
            if response.status_code >= 500 and len(report.server_errors) < keep_errors:
                report.server_errors.append({"operation": label,  # noqa: B023 "status": response.status_code,
                                             "body": response.text[:500], "curl": case.as_curl_command()})

        one()
    report.by_status = dict(sorted(statuses.items()))
    report.calls = sum(statuses.values())
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def _error_key(response: Any) -> str:
    try:
        err = response.json()["error"]
        return f"{response.status_code} {err.get('code')} {err.get('param')}"
    except Exception:  # not our error shape: counted as such
        return f"{response.status_code} (not OpenAI error JSON)"
