"""`dlengine router` splitting requests over real `dlengine serve --mode prefill` and
`--mode decode` engines (CPU, the tiny fixture model, KV over TCP), driven by the
official `openai` client. Greedy answers through a prefill/decode pair must equal an
aggregated engine's, streamed or not; killing either engine, a client leaving, or a
lease expiring must leave no block held on either side and no request hanging."""

import pytest

from test_router_harness import MODEL, Cluster, http, skip_reason, wait_until

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

openai = pytest.importorskip("openai")

WORKER_HEADER = "x-dlengine-worker"
PREFILL_HEADER = "x-dlengine-prefill-worker"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def engine(cluster, name, mode, extra=()):
    e = cluster.engine(name, ["--mode", mode, *extra])
    e.key = e.key.replace("/aggregated/", f"/{mode}/")
    return e


def metric(url, name):
    status, text = http("GET", f"{url}/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def client_for(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_split_answers_equal_an_aggregated_engines(cluster):
    reference = cluster.engine("pd-agg")
    prefill = engine(cluster, "pd-p", "prefill")
    decode = engine(cluster, "pd-d", "decode")
    for e in (reference, prefill, decode):
        e.wait_registered()
    router = cluster.router("cache-aware")
    router.wait_workers(3)
    routed, direct = client_for(router.url), client_for(reference.url)
    prompt = "The quick brown fox jumps over"

    raw = routed.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    assert (raw.headers.get(WORKER_HEADER), raw.headers.get(PREFILL_HEADER)) == ("pd-d", "pd-p")
    want = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    got = raw.parse()
    assert got.choices[0].text == want.choices[0].text
    assert got.usage.completion_tokens == want.usage.completion_tokens == 8

    messages = [{"role": "user", "content": "Tell me about disaggregated serving"}]
    chunks = list(routed.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = direct.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    assert text == want.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want.usage.completion_tokens

    # One token: prefill finishes alone; the stream is made from its answer.
    chunks = list(routed.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True, **GREEDY))
    want = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY)
    assert "".join(c.choices[0].text for c in chunks) == want.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    assert metric(router.url, "dlengine_router_pd_requests_total") == 3
    assert metric(router.url, "dlengine_router_pd_prefill_finished_total") == 1
    assert metric(router.url, "dlengine_router_pd_retries_total") == 0
    wait_until("prefill released every lease", lambda: metric(prefill.url, "dlengine_kv_leases") == 0, timeout=10)
    # Two answers came from decode, their KV over TCP (CPU engines).
    assert metric(decode.url, 'dlengine_kv_imports{transport="tcp",outcome="done"}') == 2
    assert metric(decode.url, 'dlengine_kv_imports{transport="tcp",outcome="failed"}') == 0
    assert metric(decode.url, 'dlengine_kv_import_bytes{transport="tcp"}') > 0


def split_cluster(cluster, prefill_extra=(), decode_extra=()):
    prefill = engine(cluster, "f-p", "prefill", prefill_extra)
    decode = engine(cluster, "f-d", "decode", decode_extra)
    for e in (prefill, decode):
        e.wait_registered()
    router = cluster.router("round-robin")
    router.wait_workers(2)
    return prefill, decode, router


def no_blocks_held(prefill, decode):
    return (metric(prefill.url, "dlengine_kv_leases") == 0
            and metric(prefill.url, "dlengine_kv_cache_blocks_used") == 0
            and metric(decode.url, "dlengine_kv_cache_blocks_used") == 0)


LONG = {"temperature": 0, "extra_body": {"ignore_eos": True}, "max_tokens": 1500}


def test_prefill_killed_after_handoff_does_not_stop_decode(cluster):
    prefill, decode, router = split_cluster(cluster)
    stream = client_for(router.url).completions.create(model=MODEL, prompt="Once upon a time", stream=True,
                                                        stream_options={"include_usage": True}, **LONG)
    chunks = [next(stream)]
    prefill.process.kill9()
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 1500
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    wait_until("decode freed its blocks", lambda: metric(decode.url, "dlengine_kv_cache_blocks_used") == 0, timeout=10)


def test_decode_killed_mid_stream_ends_the_stream_with_an_error_and_prefill_keeps_nothing(cluster):
    prefill, decode, router = split_cluster(cluster)
    stream = client_for(router.url).completions.create(model=MODEL, prompt="Once upon a time", stream=True, **LONG)
    next(stream)
    decode.process.kill9()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    wait_until("prefill released its lease", lambda: metric(prefill.url, "dlengine_kv_leases") == 0, timeout=10)
    assert metric(prefill.url, "dlengine_kv_cache_blocks_used") == 0


def test_client_disconnect_frees_blocks_on_both_sides(cluster):
    prefill, decode, router = split_cluster(cluster)
    stream = client_for(router.url).completions.create(model=MODEL, prompt="Once upon a time", stream=True, **LONG)
    next(stream), next(stream)
    stream.close()
    wait_until("both sides freed every block", lambda: no_blocks_held(prefill, decode), timeout=10)


def test_an_unclaimed_lease_expires_and_a_late_pull_fails_cleanly(cluster):
    prefill, decode, router = split_cluster(cluster, prefill_extra=["--kv-lease-secs", "1"])
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, answer = http("POST", f"{prefill.url}/v1/completions", dict(body, kv_transfer_params={"do_remote_decode": True}))
    assert status == 200 and answer["kv_transfer_params"]["lease_id"]
    assert metric(prefill.url, "dlengine_kv_leases") == 1
    wait_until("the lease expired", lambda: no_blocks_held(prefill, decode), timeout=10)
    status, error = http("POST", f"{decode.url}/v1/completions", dict(body, kv_transfer_params=answer["kv_transfer_params"]))
    assert status == 503 and error["error"]["code"] == "kv_transfer_failed", error
    assert metric(decode.url, 'dlengine_kv_imports{transport="tcp",outcome="failed"}') == 1
    assert "unknown or expired KV lease" in error["error"]["message"]


def test_a_descriptor_for_another_layout_or_prompt_is_refused(cluster):
    prefill, decode, router = split_cluster(cluster)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    _, answer = http("POST", f"{prefill.url}/v1/completions", dict(body, kv_transfer_params={"do_remote_decode": True}))
    descriptor = answer["kv_transfer_params"]
    wrong_layout = dict(descriptor, kv_layout=dict(descriptor["kv_layout"], block_size=32))
    status, error = http("POST", f"{decode.url}/v1/completions", dict(body, kv_transfer_params=wrong_layout))
    assert status == 400 and error["error"]["code"] == "kv_layout_mismatch" and error["error"]["param"] == "kv_transfer_params"
    longer = "Once upon a time there was a prompt much longer than the one prefill computed"
    status, error = http("POST", f"{decode.url}/v1/completions", dict(body, prompt=longer, kv_transfer_params=descriptor))
    assert status == 400 and "tokenized to" in error["error"]["message"], error
    same_length = list(range(100, 100 + answer["usage"]["prompt_tokens"]))
    status, error = http("POST", f"{decode.url}/v1/completions", dict(body, prompt=same_length, kv_transfer_params=descriptor))
    assert status == 400 and "differ from those prefill computed" in error["error"]["message"], error
    http("POST", f"{prefill.url}/pd/free", {"lease_id": descriptor["lease_id"]})
    wait_until("no blocks held", lambda: no_blocks_held(prefill, decode), timeout=10)


def test_a_bounded_load_through_one_pair_loses_no_request(cluster):
    from concurrent.futures import ThreadPoolExecutor

    prefill, decode, router = split_cluster(cluster)
    client = client_for(router.url)

    def one(i):
        answer = client.completions.create(model=MODEL, prompt="word " * (1 + i % 40), max_tokens=4 + i % 20, **GREEDY)
        return answer.usage.completion_tokens == 4 + i % 20

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(one, range(96)))
    assert all(results), f"{results.count(False)} of {len(results)} requests came back short"
    assert metric(router.url, "dlengine_router_pd_requests_total") == 96
    wait_until("no blocks held", lambda: no_blocks_held(prefill, decode), timeout=10)
