"""`dlengine router` splitting requests over real `dlengine serve --mode prefill` and
`--mode decode` engines (CPU, the tiny fixture model, KV over the engines' own transport),
driven by the official `openai` client. Greedy answers through a prefill/decode pair must
equal an aggregated engine's, streamed or not, and every lease prefill took is released."""

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


def engine(cluster, name, mode):
    e = cluster.engine(name, ["--mode", mode])
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
