"""`puyu serve --replicas 2` on a real local Ray: two CPU replicas of a tiny checkpoint behind one ingress, called
with the openai SDK. One server for the module (Ray's start-up dominates); the test that kills a replica runs last."""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'puyu[ray]')")
openai = pytest.importorskip("openai")

from puyu.testing import ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.ray
ENGINE_FLAGS = ["--session-len", "1024", "--cache-max-entry-count", "96", "--cache-block-seq-len", "16"]
KEY = "secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory, internlm2_checkpoint: Path):
    port = free_port()
    log = tmp_path_factory.mktemp("replicas") / "serve.log"
    cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--replicas", "2",
           "--replica-threads", "1", "--server-port", str(port), "--api-keys", KEY, "--model-name", "m",
           "--log-level", "warning", *ENGINE_FLAGS]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with ServerProcess(cmd, port, log, "/health", env=env) as proc:
        proc.wait_ready(400)  # Ray's start-up on 2 busy cores, not a measured timing
        wait_for(lambda: health(proc)["replicas"]["up"] == 2, "both replicas up")
        yield proc


def wait_for(cond, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"never happened: {what}")


def client(server: ServerProcess):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def health(server: ServerProcess) -> dict:
    return httpx.get(server.base_url + "/health", timeout=10).json()


def live(server: ServerProcess) -> dict[str, dict]:
    return health(server)["replicas"]["live"]


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def quiet(server: ServerProcess) -> dict[str, dict]:
    """The replicas' counters once they stop changing (what earlier tests sent has been posted and read)."""
    last = live(server)
    for _ in range(80):
        time.sleep(1.5)  # longer than a post (0.5 s) plus the ingress's read (0.5 s)
        now = live(server)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the replicas' counters never settled: {last}")


def settled(server: ServerProcess, key: str, expected: int) -> None:
    """Wait until the replicas' posted counters add up to `expected` (they post twice a second)."""
    wait_for(lambda: sum(r[key] for r in live(server).values()) >= expected, f"{key} reaches {expected}")


def test_the_api_through_two_replicas(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["m"]
    reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                      temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    chunks = list(c.completions.create(model="m", prompt="one two three", max_tokens=6, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) and chunks[-1].choices[0].finish_reason
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="m", prompt="word " * 3000, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    h = health(server)
    assert h["status"] == "ok" and h["replicas"]["up"] == h["replicas"]["total"] == 2
    assert metric(server, "puyu_kv_blocks_total") == 2 * 96  # summed over both replicas


def test_shared_prefixes_stay_on_their_replica_and_mixed_load_spreads(server):
    c = client(server)
    system = "You are a careful assistant who answers in one word. " * 12  # ~20 blocks of 16 tokens
    before = quiet(server)
    n = 6
    for i in range(n):
        c.chat.completions.create(model="m", max_tokens=2, temperature=0,
                                  messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": f"question {i}"}])
    settled(server, "requests", sum(r["requests"] for r in before.values()) + n)
    after = live(server)
    gained = {rid: after[rid]["requests"] - before.get(rid, {}).get("requests", 0) for rid in after}
    hits = {rid: after[rid]["prefix_cache_hits"] - before.get(rid, {}).get("prefix_cache_hits", 0) for rid in after}
    assert sorted(gained.values()) == [0, n], gained  # every request with the prefix went to one replica
    assert max(hits.values()) == n - 1  # ... and every one after the first reused its cached blocks

    # distinct prompts sent at once: both replicas get work
    before = quiet(server)
    threads = [threading.Thread(target=c.completions.create,
                                kwargs=dict(model="m", prompt=f"topic {i} " * (5 + i), max_tokens=8,
                                            extra_body={"ignore_eos": True})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settled(server, "requests", sum(r["requests"] for r in before.values()) + 8)
    after = live(server)
    assert all(after[rid]["requests"] > before[rid]["requests"] for rid in after)


def test_a_client_that_leaves_aborts_its_request_on_the_replica(server):
    c = client(server)
    start = metric(server, "puyu_generation_tokens_total")
    stream = c.completions.create(model="m", prompt="go on", max_tokens=900, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_for(lambda: metric(server, "puyu_requests_running") == 0, "the request leaves the replica")
    time.sleep(1.0)  # let the last post land; the assertion holds however long this takes
    assert metric(server, "puyu_generation_tokens_total") - start < 900  # aborted: it never generated them all


def test_a_killed_replica_fails_only_its_requests_and_comes_back(server):
    c = client(server)
    results: dict[int, object] = {}
    first = [threading.Event() for _ in range(4)]

    def run(i: int) -> None:
        text = ""
        try:
            for ch in c.completions.create(model="m", prompt=f"story {i} " * (3 + i), max_tokens=950, stream=True,
                                           extra_body={"ignore_eos": True}):
                first[i].set()
                text += ch.choices[0].text if ch.choices else ""
            results[i] = text
        except Exception as exc:  # what the client sees for a request cut by the replica's death
            results[i] = exc
        finally:
            first[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for e in first:
        assert e.wait(120)
    victim_id, victim = next(iter(live(server).items()))
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)  # nothing hangs
    failed = [r for r in results.values() if isinstance(r, Exception)]
    assert 1 <= len(failed) <= 3  # the killed replica's requests only (the router spread the four)
    assert all("replica" in str(e) for e in failed), failed
    assert all(isinstance(r, str) and r for r in results.values() if not isinstance(r, Exception))
    wait_for(lambda: health(server)["replicas"]["up"] == 2 and victim_id not in live(server),
             "Ray restarts the replica", limit_s=300)
    reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}], max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_ray_address_deploys_onto_a_running_cluster(tmp_path, internlm2_checkpoint):
    """`ray start --head --block` (its processes end with it), then `puyu serve --ray-address`: served, and the
    app is removed from the cluster when `puyu serve` stops."""
    import subprocess

    ray_port, port = free_port(), free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port", str(ray_port), "--num-cpus", "1",
                             "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    try:
        cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2_checkpoint), "--ray-address",
               f"127.0.0.1:{ray_port}", "--replicas", "1", "--server-port", str(port), "--model-name", "m",
               "--log-level", "warning", *ENGINE_FLAGS]
        with ServerProcess(cmd, port, tmp_path / "serve.log", "/health", env=env) as proc:
            proc.wait_ready(400)
            reply = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="x", max_retries=0).completions.create(
                model="m", prompt="hi", max_tokens=3)
            assert reply.usage.completion_tokens >= 1
            assert health(proc)["replicas"]["total"] == 1
        check = ("import ray, sys; ray.init(address=sys.argv[1], logging_level=40); from ray import serve; "
                 "print(sorted(serve.status().applications))")
        apps = subprocess.run([sys.executable, "-c", check, f"127.0.0.1:{ray_port}"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert apps.stdout.strip().splitlines()[-1] == "[]", apps.stderr[-2000:]
    finally:
        head.terminate()
        head.wait(timeout=60)
