"""LoRA adapters through the real server (uvicorn on 127.0.0.1) with the `openai` SDK, in vLLM's shapes: `model`
picks the base model or an adapter, /v1/models lists them, /v1/load_lora_adapter and /v1/unload_lora_adapter change
them at run time, bad adapters are 400s naming the file and the field; and `puyu serve --lora` as a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import httpx
import openai
import pytest
import torch

from puyu.config import EngineConfig
from puyu.serve.api_server import create_app
from puyu.testing import ServerProcess, ServerThread, free_port
from puyu.tiny_lora import build_peft_adapter, peft_reference

pytest.importorskip("peft")

MODEL = "tiny-internlm2"
TARGETS = ["wqkv", "wo", "w1", "w2", "w3"]
PROMPT = [5, 17, 99, 240, 31, 8, 77, 400, 12, 61, 9, 300]
NEW = 10


@pytest.fixture(scope="module")
def adapters(internlm2_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lora")
    return {name: build_peft_adapter(internlm2_checkpoint, root / name, TARGETS, r=4, alpha=16, seed=seed)
            for name, seed in (("sql", 1), ("poet", 2))}


@pytest.fixture(scope="module")
def expected(internlm2_checkpoint, adapters, tmp_path_factory, reference_greedy_text):
    """Greedy continuations of PROMPT by transformers on the base and on each peft-merged adapter."""
    from puyu.convert.reference import load_reference_model

    root = tmp_path_factory.mktemp("serve-lora-ref")
    refs = {MODEL: load_reference_model(internlm2_checkpoint, torch.float32)}
    refs.update({n: peft_reference(internlm2_checkpoint, d, root / n) for n, d in adapters.items()})
    return {name: reference_greedy_text(ref) for name, ref in refs.items()}


@pytest.fixture(scope="module")
def reference_greedy_text(internlm2_checkpoint):
    from puyu.tokenizer import Tokenizer

    tok = Tokenizer(internlm2_checkpoint)

    def run(ref) -> str:
        ids = list(PROMPT)
        with torch.no_grad():
            for _ in range(NEW):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        # the reply is cut by length: the server drops a trailing incomplete character instead of sending U+FFFD
        return tok.decode(ids[len(PROMPT):], skip_special_tokens=True).rstrip("\ufffd")

    return run


@pytest.fixture(scope="module")
def server(internlm2_checkpoint, adapters):
    from puyu.engine import AsyncEngine

    engine = AsyncEngine(internlm2_checkpoint, EngineConfig(dtype="float32", session_len=256,
                                                            cache_max_entry_count=128, cache_block_seq_len=16),
                         adapters={"sql": adapters["sql"]})
    with ServerThread(create_app(engine, model_name=MODEL, allow_runtime_lora=True)) as srv:
        yield srv
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(client, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.model == model
    return out.choices[0].text


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_models_list_the_base_and_its_adapters(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "sql"}
    assert cards["sql"].model_extra["parent"] == MODEL and cards["sql"].model_extra["root"] == str(adapters["sql"])


def test_model_picks_the_adapter(client, expected):
    assert expected["sql"] != expected[MODEL]  # the adapter changes the reply
    assert _complete(client, "sql") == expected["sql"]
    assert _complete(client, MODEL) == expected[MODEL]
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.model == "sql"
    with pytest.raises(openai.NotFoundError, match="'poet' does not exist"):
        _complete(client, "poet")


def test_load_and_unload_at_run_time(server, client, adapters, expected):
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "poet", "lora_path": str(adapters["poet"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poet' added successfully.", r.text
    assert {m.id for m in client.models.list().data} == {MODEL, "sql", "poet"}
    assert _complete(client, "poet") == expected["poet"]
    r = _post(server, "/v1/unload_lora_adapter", {"lora_name": "poet"})
    assert r.status_code == 200 and "removed" in r.text, r.text
    assert {m.id for m in client.models.list().data} == {MODEL, "sql"}
    with pytest.raises(openai.NotFoundError):
        _complete(client, "poet")


def _error(r: httpx.Response, *words: str, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


def test_bad_adapters_are_400s_naming_file_and_field(server, adapters, tmp_path):
    missing = tmp_path / "absent"
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(missing)}),
           str(missing), "no such adapter directory", param="lora_path")
    bad_target = tmp_path / "target"
    shutil.copytree(adapters["poet"], bad_target)
    cfg = json.loads((bad_target / "adapter_config.json").read_text())
    (bad_target / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["wqkv", "gate_proj"]}))
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(bad_target)}),
           str(bad_target / "adapter_config.json"), "target_modules", "'gate_proj'", param="lora_path")
    no_weights = tmp_path / "weights"
    shutil.copytree(adapters["poet"], no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(no_weights)}),
           str(no_weights / "adapter_model.safetensors"), "missing", param="lora_path")
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["poet"])}),
           "already loaded", param="lora_name")
    _error(_post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}), "no adapter 'nope'", param="lora_name")
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert httpx.get(server.url + "/health").status_code == 200  # the server goes on


def test_serve_cli_lora_flag(internlm2_checkpoint, adapters, expected, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--server-port", str(port),
           "--model-name", MODEL, "--lora", f"sql={adapters['sql']}", f"poet={adapters['poet']}", "--dtype",
           "float32", "--log-level", "warning", "--session-len", "256", "--cache-max-entry-count", "64",
           "--cache-block-seq-len", "16"]
    with ServerProcess(cmd, port, tmp_path / "serve.log", "/health", env=dict(os.environ)) as server:
        server.wait_ready(120)  # start-up, not a measured timing
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {MODEL, "sql", "poet"}
        assert _complete(client, "poet") == expected["poet"]
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0


def test_serve_cli_lora_errors_are_one_line(internlm2_checkpoint, tmp_path):
    import subprocess

    for flag, words in ((["--lora", "sql"], "--lora: 'sql' must be NAME=PATH"),
                        (["--lora", f"sql={tmp_path / 'nope'}"], "is not a directory")):
        proc = subprocess.run([sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), *flag,
                               "--server-port", str(free_port())], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_runtime_adapter_loading_is_opt_in(server, adapters):
    """Without --allow-runtime-lora the load/unload endpoints do not exist (they would read any server-side path)."""
    engine = server.server.config.app.state.engine
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": str(adapters["poet"])},
                       timeout=30)
        assert r.status_code == 404, r.text
        assert MODEL in {m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]}
