"""Downloads against a real hub-compatible server on 127.0.0.1 (olah serving a local repository, see hub_server.py).

The served repository `internlm/internlm2-chat-7b` is a tiny InternLM2 checkpoint (weights stored as git LFS
objects, as on the hub) with two revisions: tag v1.0 and branch main. Every `puyu` call is a real subprocess with
HF_ENDPOINT pointing at the server; nothing reaches the internet.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from puyu.testing import ServerProcess, free_port

pytest.importorskip("olah", reason="the hub-compatible test server is olah (test extra)")
if shutil.which("git") is None:
    pytest.skip("olah serves local repositories from git; no git here", allow_module_level=True)

REPO = "internlm/internlm2-chat-7b"
SHARD = "model-00001-of-00002.safetensors"
LFS_SUFFIXES = (".safetensors",)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=puyu", "-c", "user.email=puyu@localhost", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def _add_lfs(repo: Path, name: str, data: bytes) -> None:
    """Store `data` the way a hub repository does: a pointer in git, the bytes in .git/lfs/objects."""
    oid = hashlib.sha256(data).hexdigest()
    obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    (repo / name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")


def _with_marker(config: dict, marker: str) -> str:
    return json.dumps({**config, "puyu_test_revision": marker}, indent=2)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, internlm2_checkpoint: Path) -> Path:
    """mirrors/models/internlm/internlm2-chat-7b: a git repository with tag v1.0 and a later commit on main."""
    root = tmp_path_factory.mktemp("mirrors")
    repo = root / "models" / REPO
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    config = json.loads((internlm2_checkpoint / "config.json").read_text())
    for src in sorted(internlm2_checkpoint.iterdir()):
        if src.suffix in LFS_SUFFIXES:
            _add_lfs(repo, src.name, src.read_bytes())
        elif src.name != "config.json":
            shutil.copy(src, repo / src.name)
    (repo / "README.md").write_text("---\nlicense: other\n---\n# tiny InternLM2 served by the tests\n")
    (repo / "config.json").write_text(_with_marker(config, "v1.0"))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "v1.0")
    _git(repo, "tag", "v1.0")
    (repo / "config.json").write_text(_with_marker(config, "main"))
    _git(repo, "commit", "-q", "-am", "update config")
    return root


@pytest.fixture(scope="module")
def hub(mirror: Path, tmp_path_factory) -> str:
    """The server's URL; its log and faults are reset before each test by `clean_hub`."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("olah")
    cmd = [sys.executable, str(Path(__file__).with_name("hub_server.py")), "--mirrors", str(mirror), "--workdir",
           str(workdir), "--port", str(port)]
    with ServerProcess(cmd, port, workdir / "server.log", "/_test/log", env=dict(os.environ), cwd=workdir) as server:
        server.wait_ready(120)
        yield server.base_url


@pytest.fixture()
def clean_hub(hub: str) -> str:
    httpx.post(f"{hub}/_test/reset").raise_for_status()
    return hub


def requests_seen(hub: str) -> list[dict]:
    return httpx.get(f"{hub}/_test/log").json()


def file_gets(hub: str, name: str) -> list[dict]:
    return [r for r in requests_seen(hub) if r["method"] == "GET" and r["path"].endswith("/" + name)]


def puyu(args: list[str], home: Path, endpoint: str | None) -> subprocess.CompletedProcess:
    """`puyu ARGS` in a subprocess with its own Hugging Face home and HF_ENDPOINT=endpoint (unset if None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home / "hf"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONIOENCODING="utf-8")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, "-m", "puyu.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def printed_path(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("puyu: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_include_downloads_only_config_json(clean_hub: str, mirror: Path, tmp_path: Path) -> None:
    """The tutorial's first exercise: only config.json of InternLM2-Chat-7B, through a mirror (HF_ENDPOINT)."""
    path = printed_path(puyu(["download", "internlm2-chat-7b", "--include", "config.json"], tmp_path, clean_hub))
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    assert json.loads((path / "config.json").read_text())["puyu_test_revision"] == "main"
    assert path.is_relative_to(tmp_path / "hf" / "hub")  # the Hugging Face cache by default
    assert file_gets(clean_hub, SHARD) == []


def test_exclude_and_local_dir(clean_hub: str, mirror: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    path = printed_path(puyu(["download", REPO, "--exclude", "model-00002-*", "README.md", "--local-dir", str(out)],
                             tmp_path, clean_hub))
    assert path == out
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", SHARD} <= names
    assert "model-00002-of-00002.safetensors" not in names and "README.md" not in names
    assert (out / SHARD).read_bytes() == _lfs_bytes(mirror, SHARD) and not (out / SHARD).is_symlink()
    assert len(file_gets(clean_hub, SHARD)) == 1  # fetched once (resumably), then accepted by huggingface_hub


def test_revision_selects_the_tagged_commit(clean_hub: str, mirror: Path, tmp_path: Path) -> None:
    args = ["download", REPO, "--revision", "v1.0", "--include", "config.json", "--endpoint", clean_hub]
    path = printed_path(puyu(args, tmp_path, None))  # the mirror given as --endpoint instead of HF_ENDPOINT
    assert json.loads((path / "config.json").read_text())["puyu_test_revision"] == "v1.0"
    assert path.name == _git(mirror / "models" / REPO, "rev-parse", "v1.0")


def test_interrupted_download_resumes_on_the_next_call(clean_hub: str, mirror: Path, tmp_path: Path) -> None:
    cut = 40_000
    # The link drops after `cut` bytes of the shard, and the client's own retry then finds it down (503).
    httpx.post(f"{clean_hub}/_test/faults", json={"file": SHARD, "drop_after": cut, "fail_next": 1})
    first = puyu(["download", REPO, "--include", "*.safetensors"], tmp_path, clean_hub)
    message = one_line_error(first)
    assert "interrupted" in message and SHARD in message and "resume" in message
    partials = list((tmp_path / "hf").rglob("*.puyu-partial"))
    assert len(partials) == 1 and partials[0].stat().st_size == cut

    path = printed_path(puyu(["download", REPO, "--include", "*.safetensors"], tmp_path, clean_hub))
    assert (path / SHARD).read_bytes() == _lfs_bytes(mirror, SHARD)
    ranges = [r["range"] for r in file_gets(clean_hub, SHARD)]
    # First call: the cut GET, then its retry from the cut (503). Second call: only the rest, nothing fetched twice.
    assert ranges == [None, f"bytes={cut}-", f"bytes={cut}-"]
    assert not list((tmp_path / "hf").rglob("*.puyu-partial"))


def _lfs_bytes(mirror: Path, name: str) -> bytes:
    pointer = (mirror / "models" / REPO / name).read_text()
    oid = pointer.split("oid sha256:")[1].split()[0]
    return (mirror / "models" / REPO / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes()


def test_missing_repository_is_a_clear_error(clean_hub: str, tmp_path: Path) -> None:
    message = one_line_error(puyu(["download", "internlm/no-such-model"], tmp_path, clean_hub))
    assert "internlm/no-such-model" in message and "not found" in message and clean_hub in message


def test_unreachable_endpoint_names_it_and_the_mirror_setting(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    message = one_line_error(puyu(["download", REPO, "--include", "config.json"], tmp_path, dead))
    assert dead in message and "HF_ENDPOINT" in message and "--endpoint" in message


def test_unknown_name_suggests_the_closest(tmp_path: Path) -> None:
    message = one_line_error(puyu(["download", "internlm2-chat-7"], tmp_path, None))
    assert "'internlm2-chat-7b'" in message


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to produce a real ENOSPC")
def test_full_disk_says_where_and_how_much(clean_hub: str, mirror: Path, tmp_path: Path) -> None:
    """The shard's partial file is /dev/full, so the kernel answers the first write with ENOSPC."""
    data = _lfs_bytes(mirror, SHARD)
    blobs = tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--")) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / (hashlib.sha256(data).hexdigest() + ".puyu-partial")).symlink_to("/dev/full")
    message = one_line_error(puyu(["download", REPO, "--include", SHARD], tmp_path, clean_hub))
    assert "no space left" in message and str(blobs) in message
    assert f"{len(data) / 1000:.1f} KB" in message  # how much the download still needed


def test_resolve_downloads_on_first_use_then_uses_the_cache(clean_hub: str, tmp_path: Path) -> None:
    code = ("import sys; from puyu.resolve import resolve_model_path; from puyu.convert.spec import read_model_spec;"
            "p = resolve_model_path(sys.argv[1]); print(read_model_spec(p).arch); print(p)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=clean_hub)
    first = subprocess.run([sys.executable, "-c", code, "internlm2-chat-7b"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    arch, path = first.stdout.split()[-2:]
    assert arch == "internlm2" and (Path(path) / SHARD).is_file()
    assert len(file_gets(clean_hub, SHARD)) == 1
    listed = puyu(["models", "--json"], tmp_path, None)
    assert {e["name"]: e["local_path"] for e in json.loads(listed.stdout)}["internlm2-chat-7b"] == path
    httpx.post(f"{clean_hub}/_test/reset")

    # Second use: the hub is not asked at all (and here it could not be: offline, endpoint dead).
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_OFFLINE="1")
    second = subprocess.run([sys.executable, "-c", code, REPO], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[-1] == path
    assert requests_seen(clean_hub) == []
