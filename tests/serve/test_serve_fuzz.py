"""schemathesis against /openapi.json of the real server: no generated request, valid or not, gets a 5xx."""
from __future__ import annotations

import pytest

from puyu.config import EngineConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerThread


@pytest.mark.parametrize("api_key", [None, "fuzz-key"])
def test_serve_openapi_fuzzing_finds_no_5xx(internlm2_checkpoint, api_key):
    from puyu.engine import AsyncEngine
    from puyu.serve.fuzz import fuzz

    with AsyncEngine(internlm2_checkpoint, EngineConfig(session_len=96, cache_max_entry_count=512,
                                                        cache_block_seq_len=16)) as engine:
        with ServerThread(create_app(engine, "tiny", [api_key] if api_key else ())) as srv:
            report = fuzz(srv.url, "tiny", max_examples=15, api_key=api_key, seed=1)
        assert engine.stats()["blocks_used"] == 0
    assert report.num_5xx == 0, report.server_errors
    assert report.by_status.get("200", 0) > 0 and report.by_status.get("400", 0) > 0  # both paths were reached
    assert set(report.by_operation) >= {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"}
