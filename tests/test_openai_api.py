"""The OpenAI-compatible endpoints driven by the official `openai` client against serve_api.py on
127.0.0.1 (tiny Llama adapter): the same summary streamed and not as /summarize, completions,
window parts of a long dialogue on the stream, seeded sampling, stop/max_tokens, raw prompts,
errors in the OpenAI shape, 1,000 requests at concurrency 32, and clients that hang up."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from conftest import SAMPLES
from serving_helpers import parse_sse, start_server
from tests.adapters import make_adapter

openai = pytest.importorskip("openai")

TOKEN = "sk-test-openai"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROWS = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
DIALOGUES = [r["dialogue"] for r in ROWS if len(r["dialogue"]) < 600][:6]
LONG = next(r["dialogue"] for r in ROWS if r["id"] == "sample-long-meeting")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    adapter = make_adapter(tiny_models["llama"], root / "lora", max_input_length=512)
    running = start_server(adapter, root, "--max_new_tokens=8", "--batch_wait_ms=10", "--batch_size=8",
                           "--max_new_tokens_limit=64", env={"FTF_API_TOKEN": TOKEN})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def summarize(server, dialogue: str, **generation) -> dict:
    body = {"dialogue": dialogue, **({"generation": generation} if generation else {})}
    response = httpx.post(f"{server.url}/summarize", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_says_which_prompt_wraps_the_dialogue(client, model_id):
    models = client.models.list().data
    assert [m.id for m in models] == [model_id] == ["lora"]
    facts = models[0].model_extra["ftf"]
    assert facts["instruction"] == "Summarize the following dialogue in one to three sentences."
    assert "chat template" in facts["prompt"] and "raw_prompt" in facts["prompt"]
    assert facts["max_input_length"] == 512 and facts["effective_defaults"]["max_new_tokens"] == 8
    assert client.models.retrieve(model_id).id == model_id


def test_chat_gives_the_summarize_summary_streamed_and_not(server, client, model_id):
    for dialogue in DIALOGUES[:3]:
        expected = summarize(server, dialogue)
        reply = client.chat.completions.create(model=model_id, messages=[
            {"role": "system", "content": "ignored: the model's own instruction is used"},
            {"role": "user", "content": dialogue}])
        choice = reply.choices[0]
        assert choice.message.content == expected["summary"] and choice.message.role == "assistant"
        assert choice.finish_reason == expected["finish_reasons"][0]
        assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": dialogue}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == expected["summary"] and reasons == [choice.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_completions_one_prompt_or_several(server, client, model_id):
    expected = [summarize(server, d)["summary"] for d in DIALOGUES[:2]]
    one = client.completions.create(model=model_id, prompt=DIALOGUES[0])
    assert one.choices[0].text == expected[0] and one.object == "text_completion"
    several = client.completions.create(model=model_id, prompt=DIALOGUES[:2])
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == expected
    streamed = client.completions.create(model=model_id, prompt=DIALOGUES[:2], stream=True)
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == expected


def test_a_long_dialogue_streams_its_windows_first(server, client, model_id):
    expected = summarize(server, LONG)
    assert expected["windows"][0] > 4
    chunks = list(client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": LONG}],
                                                 stream=True))
    parts = [c.model_extra["ftf"] for c in chunks if (c.model_extra or {}).get("ftf", {}).get("type") == "part"]
    first_level = sorted(p["part"] for p in parts if p["level"] == 0)
    assert first_level == list(range(1, expected["windows"][0] + 1))
    content = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content]
    assert content and content[0] > max(i for i, c in enumerate(chunks)
                                        if (c.model_extra or {}).get("ftf", {}).get("type") == "part")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["summary"]
    pieces = {}
    for c in chunks:
        ftf = (c.model_extra or {}).get("ftf") or {}
        if ftf.get("type") == "part_delta":
            key = (ftf["level"], ftf["part"])
            pieces[key] = pieces.get(key, "") + ftf["text"]
    assert pieces and all(pieces.get((p["level"], p["part"]), "") == p["summary"] for p in parts)   # each part streamed
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": model_id, "messages": [{"role": "user", "content": LONG}], "stream": True}) as raw:
        events = parse_sse(raw.iter_lines())
    assert events[-1] == ("message", "[DONE]")


def test_temperature_samples_repeatably_with_a_seed(server, client, model_id):
    message = [{"role": "user", "content": DIALOGUES[1]}]
    greedy = client.chat.completions.create(model=model_id, messages=message, temperature=0).choices[0].message
    assert greedy.content == summarize(server, DIALOGUES[1])["summary"]       # 0 = the evaluated settings
    sampled = {seed: client.chat.completions.create(model=model_id, messages=message, temperature=1.3, top_p=0.95,
                                                    seed=seed, max_tokens=12).choices[0].message.content
               for seed in (7, 8, 9)}
    again = client.chat.completions.create(model=model_id, messages=message, temperature=1.3, top_p=0.95, seed=7,
                                           max_tokens=12).choices[0].message.content
    assert again == sampled[7]
    assert len(set(sampled.values()) | {greedy.content}) > 2                  # sampling does sample


def test_stop_and_max_tokens(server, client, model_id):
    message = [{"role": "user", "content": DIALOGUES[2]}]
    short = client.chat.completions.create(model=model_id, messages=message, max_tokens=3)
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason in ("length", "stop")
    full = summarize(server, DIALOGUES[2], max_new_tokens=20)["summary"]
    assert len(full) > 4
    stop = full[2:4]
    cut = client.chat.completions.create(model=model_id, messages=message, max_tokens=20, stop=[stop, "\u2603"])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert client.completions.create(model=model_id, prompt=DIALOGUES[2], max_tokens=20,
                                     stop=stop).choices[0].text == full[:full.index(stop)]


def test_raw_prompt_sends_the_text_alone(server, client, model_id):
    message = [{"role": "user", "content": DIALOGUES[0]}]
    wrapped = client.chat.completions.create(model=model_id, messages=message)
    raw = client.chat.completions.create(model=model_id, messages=message, extra_body={"raw_prompt": True})
    instruction_tokens = wrapped.usage.prompt_tokens - raw.usage.prompt_tokens
    assert instruction_tokens > 5                                   # the instruction is not sent
    plain = client.completions.create(model=model_id, prompt=DIALOGUES[0], extra_body={"raw_prompt": True})
    assert plain.usage.prompt_tokens < raw.usage.prompt_tokens      # no chat template either


def test_errors_come_in_the_openai_shape(server, client, model_id):
    message = [{"role": "user", "content": "Anna: hi\nTom: hello"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=message)
    assert missing.value.code == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as huge:
        client.chat.completions.create(model=model_id, messages=message, max_tokens=100_000)
    assert huge.value.code == "max_tokens_too_large" and "MAX_NEW_TOKENS_LIMIT" in huge.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=model_id, messages=message, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError) as several:
        client.chat.completions.create(model=model_id, messages=message, n=2)
    assert several.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as nobody:
        client.chat.completions.create(model=model_id, messages=[{"role": "system", "content": "be brief"}])
    assert nobody.value.code == "no_user_message"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    for body, status, code in [(b"{", 400, "malformed_json"), (b'{"model": "lora"}', 422, "invalid_request"),
                               (json.dumps({"model": "lora", "messages": [{"role": "user", "content": ""}]}).encode(),
                                422, "empty_dialogue"),
                               (json.dumps({"model": "lora", "messages": [{"role": "user", "content": [
                                   {"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 422,
                                "unsupported_content"),
                               (json.dumps({"model": "lora", "prompt": [1, 2, 3]}).encode(), 422, "invalid_request")]:
        path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
        response = httpx.post(f"{server.url}{path}", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == status and response.json()["error"]["code"] == code, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.slow
def test_a_thousand_requests_at_concurrency_32(server, model_id):
    """0 errors, and every answer equals the single-request answer of its dialogue."""
    singles = [summarize(server, d)["summary"] for d in DIALOGUES]
    assert len(set(singles)) > 2
    gate = asyncio.Semaphore(32)

    async def one(client, i):
        async with gate:
            response = await client.post("/v1/chat/completions", json={
                "model": model_id, "messages": [{"role": "user", "content": DIALOGUES[i % len(DIALOGUES)]}]})
            return response.status_code, response.json()["choices"][0]["message"]["content"] \
                if response.status_code == 200 else response.text

    answers = concurrently(server, one, 1000)
    assert [status for status, _ in answers] == [200] * 1000
    assert [text for _, text in answers] == [singles[i % len(DIALOGUES)] for i in range(1000)]


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_clients_that_hang_up_leave_no_stuck_work(server, model_id):
    before = metric(server, 'ftf_cancelled_total{reason="client_left"}')

    async def hang_up(i: int):
        body = {"model": model_id, "stream": True, "max_tokens": 32, "messages": [
            {"role": "user", "content": LONG + f"\nSpeaker {i}: one more thing."}]}
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"part"' in line:
                        return True          # leave after the first window's summary
        return False

    async def run():
        return await asyncio.gather(*(hang_up(i) for i in range(6)))

    assert all(asyncio.run(run()))
    assert wait_until_idle(server) == {"status": "ok", "pending": 0, "active": 0}
    assert metric(server, 'ftf_cancelled_total{reason="client_left"}') - before >= 1
    assert summarize(server, DIALOGUES[0])["summary"]                          # still serving


def test_summaries_stream_token_by_token_and_add_up_to_the_answer(server, client, model_id):
    for dialogue in DIALOGUES[:3]:
        expected = client.chat.completions.create(model=model_id, temperature=0,
                                                  messages=[{"role": "user", "content": dialogue}])
        chunks = list(client.chat.completions.create(model=model_id, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": dialogue}]))
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(deltas) > 1 and "".join(deltas) == expected.choices[0].message.content
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])    # a split character waits for its bytes
    with httpx.stream("POST", f"{server.url}/summarize?stream=true", headers=AUTH, timeout=120,
                      json={"dialogue": DIALOGUES[0]}) as raw:
        events = parse_sse(raw.iter_lines())
    deltas = [data["text"] for kind, data in events if kind == "delta"]
    summary = next(data for kind, data in events if kind == "summary")
    assert len(deltas) > 1 and "".join(deltas) == summary["summary"] == summarize(server, DIALOGUES[0])["summary"]
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert metric(server, "ftf_time_to_first_token_seconds_count") >= 4
    assert metric(server, "ftf_inter_token_seconds_count") >= 4 and "# TYPE ftf_inter_token_seconds histogram" in text
    streamed = [line for line in server.access_lines() if line.get("streamed")]
    assert streamed and all(line["client_stayed"] is True for line in streamed)


def concurrently(server, one, n: int) -> list:
    """`one(client, i)` for i in range(n) over one client with 32 connections, gathered in order."""
    async def run():
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))
    return asyncio.run(run())


def wait_until_idle(server, seconds: float = 60) -> dict:
    """The server's /health once nothing is active or pending (or after `seconds`)."""
    deadline = time.time() + seconds
    while True:
        health = httpx.get(f"{server.url}/health").json()
        if (health["active"] == 0 and health["pending"] == 0) or time.time() >= deadline:
            return health
        time.sleep(0.2)


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server, model_id):
    async def hang_up(i: int):
        body = {"model": model_id, "stream": True, "max_tokens": 64, "messages": [
            {"role": "user", "content": DIALOGUES[i % len(DIALOGUES)] + f"\nSpeaker {i}: bye."}]}
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    choices = json.loads(line[6:]).get("choices") if line.startswith("data: {") else None
                    if choices and choices[0]["delta"].get("content"):
                        return True          # leave after the first piece of text
        return False

    async def run():
        return await asyncio.gather(*(hang_up(i) for i in range(8)))

    assert all(asyncio.run(run()))
    assert wait_until_idle(server) == {"status": "ok", "pending": 0, "active": 0}
    time.sleep(0.5)
    left = [line for line in server.access_lines() if line.get("client_stayed") is False]
    assert left and all(line["code"] == "client_left" for line in left)
    assert summarize(server, DIALOGUES[0])["summary"]                          # still serving


@pytest.mark.slow
def test_500_streamed_requests_at_concurrency_32(server, model_id):
    """0 errors, and every streamed text equals the single-request answer of its dialogue."""
    singles = [summarize(server, d)["summary"] for d in DIALOGUES]
    gate = asyncio.Semaphore(32)

    async def one(client, i):
        body = {"model": model_id, "stream": True, "messages": [{"role": "user", "content": DIALOGUES[i % 6]}]}
        async with gate, client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return response.status_code, await response.aread()
            events = parse_sse([line async for line in response.aiter_lines()])
        text = "".join((data["choices"][0]["delta"].get("content") or "") for kind, data in events
                       if isinstance(data, dict) and data.get("choices"))
        return 200, text

    answers = concurrently(server, one, 500)
    assert [status for status, _ in answers] == [200] * 500
    assert [text for _, text in answers] == [singles[i % 6] for i in range(500)]
