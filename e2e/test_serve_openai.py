"""`dlengine serve` through the official `openai` client.

scripts/tests.d/serve-e2e.sh starts the server (tiny fixture model, CPU) and sets
DLENGINE_URL; these tests only talk to it.
"""

import os

import openai
import pytest

MODEL = "qwen3-tiny"


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=os.environ["DLENGINE_URL"] + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_whole_and_streamed_agree(client):
    whole = client.completions.create(model=MODEL, prompt="The small engine read", max_tokens=6, temperature=0)
    assert whole.object == "text_completion"
    text = whole.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="The small engine read", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_n_and_seed(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2, seed=7)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_errors_are_openai_shaped(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    # Still serving afterwards.
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices
