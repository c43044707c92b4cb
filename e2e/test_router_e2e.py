"""`dlengine router` in front of real `dlengine serve` engines, driven by the official
`openai` client: the OpenAI surface, what each policy does, and failures (an engine killed
under load, the router restarted mid-load, etcd gone). Every load is bounded in count and
time and targets 127.0.0.1 only."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_router_harness import MODEL, Cluster, http, skip_reason, wait_until

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

openai = pytest.importorskip("openai")

WORKER_HEADER = "x-dlengine-worker"
# Long enough that a stream is still running when its engine is killed.
LONG_STREAM = {"max_tokens": 1000, "extra_body": {"ignore_eos": True}}
TOPICS = ["Astronomy", "Baking", "Cycling", "Databases"]


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def two_engines(cluster):
    engines = [cluster.engine("e2e-a"), cluster.engine("e2e-b")]
    for engine in engines:
        engine.wait_registered()
    return engines


def client_for(router, timeout=60):
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def chat(client, messages, **kw):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=kw.pop("max_tokens", 4), **kw)
    return raw.headers.get(WORKER_HEADER), raw.parse()


def test_openai_client_chat_completions_streaming_and_round_robin(cluster):
    a, b = two_engines(cluster)
    router = cluster.router("round-robin")
    router.wait_workers(2)
    client = client_for(router)

    assert [m.id for m in client.models.list().data] == [MODEL]
    _, answer = chat(client, [{"role": "user", "content": "Hello there"}])
    assert answer.choices[0].message.content is not None
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Stream"}], max_tokens=6, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason is not None
    text_chunks = list(client.completions.create(model=MODEL, prompt="Count", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in text_chunks)

    before = router.worker_requests()
    for i in range(20):
        client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=2)
    after = router.worker_requests()
    spread = sorted(after.get(e.url, 0) - before.get(e.url, 0) for e in (a, b))
    assert spread == [10, 10], f"round robin spread {spread}"

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_cache_aware_keeps_a_conversation_on_one_worker(cluster):
    two_engines(cluster)
    router = cluster.router("cache-aware")
    router.wait_workers(2)
    client = client_for(router)
    used = set()
    for conversation, topic in enumerate(TOPICS):
        # Conversations differ from their first words, so none shares a prefix with another.
        messages = [{"role": "system", "content": f"{topic}: you answer questions on this, tersely."}]
        workers = []
        for turn in range(4):
            messages.append({"role": "user", "content": f"Question {turn} of conversation {conversation}?"})
            worker, answer = chat(client, messages)
            workers.append(worker)
            messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
        assert len(set(workers)) == 1, f"conversation {conversation} moved between workers: {workers}"
        used.add(workers[0])
    assert len(used) == 2, "new conversations should spread over both workers"


def test_session_and_least_load_policies(cluster):
    two_engines(cluster)
    session_router = cluster.router("session")
    least_router = cluster.router("least-load")
    session_router.wait_workers(2)
    least_router.wait_workers(2)
    client = client_for(session_router)
    for user in ("alice", "bob", "carol"):
        workers = {chat(client, [{"role": "user", "content": f"hi {i}"}], user=user)[0] for i in range(4)}
        assert len(workers) == 1, f"user {user} moved: {workers}"

    # Least load: concurrent long streams spread over both engines.
    client = client_for(least_router)
    def stream(i):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=f"p{i}", stream=True, max_tokens=200, extra_body={"ignore_eos": True})
        for _ in raw.parse():
            pass
        return raw.headers.get(WORKER_HEADER)
    with ThreadPoolExecutor(8) as pool:
        workers = list(pool.map(stream, range(8)))
    assert {w: workers.count(w) for w in workers} and len(set(workers)) == 2, workers


def run_stream(client, prompt):
    """(worker, outcome) for one long stream: outcome is 'ok' or the error's text."""
    try:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, stream=True, **LONG_STREAM)
    except openai.APIError as e:
        return None, f"request failed: {e}"
    worker = raw.headers.get(WORKER_HEADER)
    try:
        finished = False
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
        return worker, "ok" if finished else "truncated without error"
    except openai.APIError as e:
        return worker, f"error: {e}"


def test_killing_an_engine_under_load(cluster):
    a, b = two_engines(cluster)
    router = cluster.router("least-load", extra=["--max-retries", "2", "--idle-timeout-secs", "10"])
    router.wait_workers(2)
    client = client_for(router, timeout=120)
    results = []
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(run_stream, client, f"load {i}") for i in range(24)]
        wait_until("streams running on a", lambda: any(f.done() for f in futures) or router_in_flight(router, a.url) > 0, timeout=30, interval=0.02)
        time.sleep(0.3)
        a.process.kill9()
        killed_at = time.monotonic()
        results = [f.result(timeout=180) for f in futures]
    failures = [(w, o) for w, o in results if o != "ok"]
    assert not [o for _, o in failures if "truncated" in o], f"silent truncation: {failures}"
    assert all(w == a.name for w, _ in failures), f"a request not on the killed engine failed: {failures}"
    assert failures, "no stream was running on the killed engine; the test proves nothing"
    assert all(o == "ok" for w, o in results if w == b.name)

    wait_until("a's key expired", lambda: a.key not in cluster.etcd.registrations(), timeout=10)
    router.wait_workers(1, timeout=5)
    attempts_on_a = router.worker_requests().get(a.url, 0)
    for i in range(10):
        client.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=2)
    assert router.worker_requests().get(a.url, 0) == attempts_on_a, "a request went to a deregistered engine"
    assert time.monotonic() - killed_at < 120


def router_in_flight(router, url):
    for line in router.metrics().splitlines():
        if line.startswith("dlengine_router_worker_in_flight{") and f'worker="{url}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0


def test_router_restart_mid_load_rebuilds_from_etcd(cluster):
    two_engines(cluster)
    first = cluster.router("round-robin")
    first.wait_workers(2)
    client = client_for(first)
    # A stream in flight when SIGTERM arrives is drained to its end.
    result = {}
    streaming = threading.Thread(target=lambda: result.update(outcome=run_stream(client, "drain me")[1]))
    streaming.start()
    wait_until("stream in flight", lambda: sum(router_in_flight(first, e.url) for e in cluster.engines) > 0, timeout=20, interval=0.02)
    assert first.process.terminate(timeout=60) == 0
    streaming.join(timeout=60)
    assert result.get("outcome") == "ok", result

    second = cluster.router("round-robin", port=first.port)
    second.wait_workers(2)
    for i in range(6):
        client.completions.create(model=MODEL, prompt=f"after restart {i}", max_tokens=2)


def test_router_keeps_serving_its_last_view_without_etcd(cluster):
    a, b = two_engines(cluster)
    router = cluster.router("round-robin")
    router.wait_workers(2)
    cluster.etcd.kill()
    time.sleep(4)  # past the engines' lease TTL
    assert router.health()["etcd_connected"] is False
    client = client_for(router)
    before = router.worker_requests()
    for i in range(6):
        client.completions.create(model=MODEL, prompt=f"no etcd {i}", max_tokens=2)
    after = router.worker_requests()
    assert all(after.get(e.url, 0) - before.get(e.url, 0) == 3 for e in (a, b))


def test_bounded_load_loses_and_duplicates_nothing(cluster):
    two_engines(cluster)
    router = cluster.router("least-load")
    router.wait_workers(2)
    total = int(os.environ.get("ROUTER_LOAD_REQUESTS", "2000"))
    concurrency = 32
    statuses = []
    lock = threading.Lock()
    deadline = time.monotonic() + 150

    def worker(offset):
        for i in range(offset, total, concurrency):
            assert time.monotonic() < deadline, "load test ran out of time"
            status, body = http("POST", f"{router.url}/v1/completions", {"model": MODEL, "prompt": f"load {i}", "max_tokens": 1}, timeout=60)
            with lock:
                statuses.append((i, status, body.get("id") if isinstance(body, dict) else None))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert len(statuses) == total
    assert sorted(i for i, _, _ in statuses) == list(range(total)), "a request was lost or answered twice"
    assert all(status == 200 for _, status, _ in statuses), [s for s in statuses if s[1] != 200][:5]
    ids = [i for _, _, i in statuses]
    assert len(set(ids)) == total, "two requests got the same completion id"
    attempts = sum(router.worker_requests().values())
    assert attempts == total, f"the router sent {attempts} attempts for {total} requests"
