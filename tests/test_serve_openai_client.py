"""`edgekit serve` driven by the official `openai` Python client (sync, async, streaming helpers).

The client is what most users point at an OpenAI-compatible server; what it sends (its own
fields, its headers, its stream parsing) is the contract, not our reading of the API reference.
"""

from __future__ import annotations

import asyncio

import pytest
from test_serve import PROMPT, bundle, call, start  # noqa: F401

openai = pytest.importorskip("openai", reason="the official openai client (the test extra) is not installed")


@pytest.fixture(scope="module")
def server(start):
    return start(max_prompt_tokens=256, max_tokens_limit=64, max_concurrency=2)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(**extra):
    return {"temperature": 0, "max_tokens": 8, "seed": 0, **extra}


def test_models_list_and_retrieve(client, server):
    assert [m.id for m in client.models.list()] == [server.model_name]
    model = client.models.retrieve(server.model_name)
    assert model.id == server.model_name and model.object == "model" and model.owned_by == "edgekit"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found" and "gpt-4o" in err.value.body["message"]


def test_one_model_route_is_bounded_and_counted_by_route(server):
    status, headers, body = call(server.url, "POST", f"/v1/models/{server.model_name}", {})
    assert status == 405 and headers["allow"] == "GET, HEAD" and body["error"]["code"] == "method_not_allowed"
    for i in range(3):  # distinct ids are one metrics series, not one per id a client makes up
        assert call(server.url, "GET", f"/v1/models/made-up-{i}")[0] == 404
    _, _, text = call(server.url, "GET", "/metrics")
    assert 'endpoint="/v1/models/{id}"' in text and "made-up" not in text
    # hostile ids: invalid UTF-8, a lone surrogate, traversal, 4 KB: one bounded 404 each, the server lives on
    for hostile in ("%ff%fe", "%ED%A0%80", "..%2F..%2Fetc%2Fpasswd", "a" * 4000, "%00"):
        status, _, body = call(server.url, "GET", f"/v1/models/{hostile}")
        assert status == 404 and body["error"]["code"] == "model_not_found", (hostile, body)
        assert len(body["error"]["message"]) < 300
    assert call(server.url, "GET", f"/v1/models/{server.model_name}")[0] == 200


def test_completion_and_chat(client, server):
    done = client.completions.create(model=server.model_name, prompt=PROMPT, **greedy())
    assert done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 8
    chat = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": PROMPT}],
                                          **greedy())
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content


def test_fields_that_do_not_change_the_answer_are_accepted_and_ignored(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model=server.model_name, messages=messages, **greedy())
    decorated = client.chat.completions.create(
        model=server.model_name, messages=messages, store=True, metadata={"session": "a1", "station": "7"},
        service_tier="auto", user="operator-3", prompt_cache_key="planner", safety_identifier="hash-0123",
        **greedy())
    assert decorated.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("field, value", [
    ("reasoning_effort", "high"),  # would change the answer: refused, not ignored
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
])
def test_fields_that_would_change_the_answer_are_refused(client, server, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": PROMPT}],
                                       extra_body={field: value}, **greedy())
    assert err.value.body["param"] == field


@pytest.mark.parametrize("extra, param", [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"service_tier": "platinum"}, "service_tier"),
    ({"store": "yes"}, "store"),
    ({"prompt_cache_key": "k" * 10_000}, "prompt_cache_key"),
])
def test_ignored_fields_are_still_bounded(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model_name, prompt=PROMPT, extra_body=extra, **greedy())
    assert err.value.body["param"] == param


def test_streaming_matches_the_plain_answer(client, server):
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model=server.model_name, messages=messages, **greedy())
    stream = client.chat.completions.create(model=server.model_name, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **greedy())
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        pieces += [c.delta.content or "" for c in chunk.choices]
    assert "".join(pieces) == plain.choices[0].message.content
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens

    # the client's streaming helper (typed events, the accumulated snapshot); its
    # get_final_completion() refuses finish_reason "length" by design, so the snapshot is read
    with client.chat.completions.stream(model=server.model_name, messages=messages, **greedy()) as helper:
        deltas = [event.delta for event in helper if event.type == "content.delta"]
        snapshot = helper.current_completion_snapshot
    assert "".join(deltas) == snapshot.choices[0].message.content == plain.choices[0].message.content
    assert snapshot.choices[0].finish_reason == plain.choices[0].finish_reason

    text = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model_name, prompt=PROMPT, stream=True, **greedy()) if c.choices)
    assert text == client.completions.create(model=server.model_name, prompt=PROMPT, **greedy()).choices[0].text


def test_async_client(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            messages = [{"role": "user", "content": PROMPT}]
            one, two = await asyncio.gather(
                client.chat.completions.create(model=server.model_name, messages=messages, **greedy()),
                client.chat.completions.create(model=server.model_name, messages=messages, **greedy()))
            streamed = []
            async for chunk in await client.chat.completions.create(model=server.model_name, messages=messages,
                                                                    stream=True, **greedy()):
                streamed += [c.delta.content or "" for c in chunk.choices]
            model = await client.models.retrieve(server.model_name)
            return one, two, "".join(streamed), model

    one, two, streamed, model = asyncio.run(main())
    assert one.choices[0].message.content == two.choices[0].message.content == streamed
    assert model.id == server.model_name
