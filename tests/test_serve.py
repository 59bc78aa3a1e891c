"""serve_api.py started for real (uvicorn on 127.0.0.1, a free port) with a tiny Llama adapter and
driven with httpx: good requests, the SSE stream of a long dialogue, every limit as a 4xx JSON
error, bearer-token auth on every route but /health, docs, metrics, the access log, and a burst of
200 concurrent requests that are micro-batched with results equal to single requests. Plus the
scheduler in process: failure isolation, round robin between clients, long jobs taking turns,
cancellation."""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from conftest import SAMPLES
from serving_helpers import start_server, stream_events
from tests.adapters import make_adapter

from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import GenerationSettings
from finetuneflow.engine.long_input import Cancelled
from finetuneflow.serve.batching import Decoding, Job, Rejected, Scheduler

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ["--max_dialogues=4", "--max_chars=3000", "--max_body_bytes=20000", "--max_new_tokens_limit=32",
          "--max_beams=4", "--max_new_tokens=8", "--batch_wait_ms=20", "--batch_size=8",
          "--request_token_budget=5000"]
ROWS = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
DIALOGUES = [r["dialogue"] for r in ROWS[:6]]
LONG = "\n".join(DIALOGUES)[:2990]          # > 512 tokens of the tiny tokenizer: summarized in windows


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    adapter = make_adapter(tiny_models["llama"], root / "lora", max_input_length=512)
    running = start_server(adapter, root, *LIMITS, env={"FTF_API_TOKEN": TOKEN})
    yield running
    running.stop()


def post(server, body=None, headers=AUTH, path="/summarize", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120, **kwargs)


def test_health_info_docs_and_auth(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"      # open for probes
    for path in ("/info", "/docs", "/openapi.json", "/metrics", "/", "/samples", "/v1/models", "/static/app.js"):
        refused = httpx.get(f"{server.url}{path}")
        assert refused.status_code == 401, path                            # every other route needs the token
        assert refused.json()["error"] == {"message": "send 'Authorization: Bearer <token>' (the token in "
                                                      "$FTF_API_TOKEN)", "type": "authentication_error",
                                           "code": "unauthorized", "param": None}
    assert httpx.get(f"{server.url}/").headers["www-authenticate"].startswith("Basic")   # a browser asks for it
    assert httpx.get(f"{server.url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    basic = "Basic " + base64.b64encode(f"me:{TOKEN}".encode()).decode()
    assert httpx.get(f"{server.url}/", headers={"Authorization": basic}).status_code == 200
    info = httpx.get(f"{server.url}/info", headers=AUTH).json()
    assert info["family"] == "causal" and info["adapter"] and info["auth_required"] is True
    assert info["limits"]["max_dialogues"] == 4 and info["defaults"]["max_new_tokens"] == 8
    assert info["max_input_length"] == 512 and info["long_input"] == "chunk"
    assert info["instruction"] == "Summarize the following dialogue in one to three sentences."
    assert httpx.get(f"{server.url}/docs", headers=AUTH).status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    body = schema["paths"]["/summarize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/SummarizeRequest")
    assert {"dialogue", "dialogues", "generation"} <= set(schema["components"]["schemas"]["SummarizeRequest"]
                                                          ["properties"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])


def test_good_requests(server):
    one = post(server, {"dialogue": DIALOGUES[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["summary"] == body["summaries"][0] and body["truncated"] == [False] and body["windows"] == [1]
    assert body["generation"]["max_new_tokens"] == 8 and body["finish_reasons"][0] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 20
    assert one.headers["x-request-id"].startswith("req-")
    many = post(server, {"dialogues": DIALOGUES[:3], "generation": {"max_new_tokens": 4, "num_beams": 2}}).json()
    assert len(many["summaries"]) == 3 and "summary" not in many
    assert many["generation"]["max_new_tokens"] == 4 and many["generation"]["num_beams"] == 2
    long = post(server, {"dialogue": LONG}).json()
    assert long["chunked"] == [True] and long["truncated"] == [False] and long["windows"][0] > 1
    no_content_type = httpx.post(f"{server.url}/summarize", content=json.dumps({"dialogue": DIALOGUES[0]}),
                                 headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert no_content_type.json()["summary"] == body["summary"]          # curl -d: the body is still JSON


def test_summarize_stream_sends_each_window_then_the_summary(server):
    plain = post(server, {"dialogue": LONG}).json()
    events = stream_events(f"{server.url}/summarize?stream=true", {"dialogue": LONG}, AUTH)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-2:] == ["summary", "done"] and "error" not in kinds
    assert all(kind == data["type"] for kind, data in events)
    start = events[0][1]
    assert start["windows"][0] > 1 and start["generation"]["max_new_tokens"] == 8
    parts = [data for kind, data in events if kind == "part" and data["level"] == 0]
    assert sorted(p["part"] for p in parts) == list(range(1, plain["windows"][0] + 1))
    assert {p["parts"] for p in parts} == {plain["windows"][0]} and all(isinstance(p["summary"], str) for p in parts)
    summary, done = events[-2][1], events[-1][1]
    assert summary["summary"] == plain["summary"] and summary["windows"] == plain["windows"][0]
    assert done["summaries"] == [plain["summary"]] and done["usage"]["prompt_tokens"] > 512
    short = stream_events(f"{server.url}/summarize?stream=true", {"dialogue": DIALOGUES[0]}, AUTH)
    assert [k for k, _ in short if k != "delta"] == ["start", "summary", "done"]
    assert short[-2][1]["summary"] == post(server, {"dialogue": DIALOGUES[0]}).json()["summary"]
    assert "".join(data["text"] for kind, data in short if kind == "delta") == short[-2][1]["summary"]


@pytest.mark.parametrize("body, headers, status, code", [
    ({"dialogue": "a: hi"}, {}, 401, "unauthorized"),
    ({"dialogue": "a: hi"}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ({"dialogue": "a: hi"}, {"Authorization": f"Bearer {TOKEN}x"}, 401, "unauthorized"),
    ({"dialogue": "a: hi"}, {"Authorization": "Basic !!!"}, 401, "unauthorized"),
    (b'{"dialogue": "a: hi"', AUTH, 400, "malformed_json"),
    (b"\xff\xfe", AUTH, 400, "malformed_json"),
    ([1, 2], AUTH, 422, "invalid_request"),
    ({"dialogue": 5}, AUTH, 422, "invalid_request"),
    ({"dialogue": "a: hi", "dialogues": ["b: yo"]}, AUTH, 422, "invalid_request"),
    ({"dialogue": "a: hi", "temperature": 0.7}, AUTH, 422, "invalid_request"),
    ({"dialogue": "a: hi", "generation": {"top_k": 3}}, AUTH, 422, "invalid_request"),
    ({"dialogue": "a: hi", "generation": {"max_new_tokens": 0}}, AUTH, 422, "invalid_request"),
    ({"dialogues": []}, AUTH, 422, "no_dialogues"),
    ({"dialogues": ["a: hi"] * 5}, AUTH, 422, "too_many_dialogues"),
    ({"dialogue": "   "}, AUTH, 422, "empty_dialogue"),
    ({"dialogue": "a" * 3001}, AUTH, 422, "dialogue_too_long"),
    ({"dialogue": "a: hi", "generation": {"max_new_tokens": 33}}, AUTH, 422, "max_new_tokens_too_large"),
    ({"dialogue": "a: hi", "generation": {"num_beams": 5}}, AUTH, 422, "num_beams_too_large"),
    ({"dialogue": "a: hi", "generation": {"min_new_tokens": 9, "max_new_tokens": 8}}, AUTH, 422, "min_over_max"),
    ({"dialogues": [LONG] * 4, "generation": {"num_beams": 4, "max_new_tokens": 32}}, AUTH, 413,
     "over_token_budget"),
    ({"dialogue": "x" * 25_000}, AUTH, 413, "body_too_large"),
])
def test_limits_are_4xx_json(server, body, headers, status, code):
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}/summarize", content=body, headers=headers, timeout=60)
    else:
        response = post(server, body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "code", "param"}
    if status == 413 and code == "over_token_budget":
        assert "REQUEST_TOKEN_BUDGET" in error["message"] and "5,000" in error["message"]


def test_chunked_body_over_the_limit_and_wrong_routes(server):
    stream = (b"x" * 5000 for _ in range(5))          # no Content-Length: counted while read
    response = httpx.post(f"{server.url}/summarize", content=stream, headers=AUTH, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{server.url}/summarize", headers=AUTH).json()["error"]["code"] == "http_405"
    assert httpx.get(f"{server.url}/nowhere", headers=AUTH).json()["error"]["code"] == "http_404"
    bad_query = post(server, {"dialogue": "a: hi"}, path="/summarize?stream=maybe")
    assert bad_query.status_code == 422 and bad_query.json()["error"]["param"] == "query.stream"


def test_burst_of_concurrent_requests_is_micro_batched(server):
    singles = [post(server, {"dialogue": d}).json()["summary"] for d in DIALOGUES]
    assert len(set(singles)) > 1                       # different inputs, different outputs: mix-ups would show
    before = httpx.get(f"{server.url}/info", headers=AUTH).json()["batching"]

    async def burst(n: int):
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post("/summarize", json={"dialogue": DIALOGUES[i % 6]})
                                          for i in range(n)))

    responses = asyncio.run(burst(200))
    assert [r.status_code for r in responses] == [200] * 200
    assert [r.json()["summary"] for r in responses] == [singles[i % 6] for i in range(200)]
    after = httpx.get(f"{server.url}/info", headers=AUTH).json()["batching"]
    assert after["dialogues"] - before["dialogues"] == 200
    assert after["batches"] - before["batches"] <= 200 // 2 and after["largest_batch"] == 8


def test_metrics_and_access_log(server):
    post(server, {"dialogue": DIALOGUES[1]})
    post(server, {"dialogue": "  "})
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['ftf_requests_total{route="/summarize",status="200"}'] >= 1
    assert samples['ftf_request_errors_total{code="empty_dialogue",route="/summarize"}'] >= 1
    assert samples['ftf_request_seconds_count{route="/summarize"}'] >= 2
    assert samples["ftf_batch_size_count"] >= 1 and samples["ftf_generated_tokens_total"] > 0
    assert "ftf_queue_length" in samples and "ftf_tokens_per_second" in samples
    assert "# TYPE ftf_request_seconds histogram" in text
    lines = server.access_lines()
    refused = [line for line in lines if line["path"] == "/summarize" and line["status"] == 422]
    assert refused and refused[-1]["code"] == "empty_dialogue" and refused[-1]["request_id"].startswith("req-")
    served = [line for line in lines if line["path"] == "/summarize" and line["status"] == 200]
    assert served and served[-1]["dialogues"] == 1 and served[-1]["ms"] > 0 and served[-1]["client"] == "127.0.0.1"


# --- the scheduler, in process -----------------------------------------------------------------
def fake_result(texts):
    n = len(texts)
    return SimpleNamespace(summaries=[t.upper() for t in texts], truncated=[False] * n, finish_reasons=["stop"] * n,
                           input_tokens=[1] * n, generated=[1] * n, settings={"num_beams": 1}, generated_tokens=n)


def run_jobs(scheduler: Scheduler, requests: list[tuple[str, list[str], list[bool]]], decoding=None,
             before_start=None, submit_first: int | None = None) -> list:
    """Queue the requests (client, dialogues, long flags; the first `submit_first`, default all)
    before the model thread starts, then run until every request is answered."""
    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job(client, texts, long, decoding or Decoding(GenerationSettings()), loop)
                for client, texts, long in requests]
        for job in jobs[:submit_first]:
            scheduler.submit(job)
        if before_start:
            before_start(jobs)
        scheduler.start()
        results = await asyncio.gather(*(asyncio.gather(*j.futures, return_exceptions=True) for j in jobs))
        for job in jobs:
            scheduler.finished(job)
        return results
    results = asyncio.run(scenario())
    assert scheduler.stop(10)
    return results


def test_scheduler_isolates_a_failing_request():
    calls = []

    def short(texts, decoding, sink=None):
        calls.append(list(texts))
        if "bad" in texts:
            raise UserError("bad dialogue")
        return fake_result(texts)

    results = run_jobs(Scheduler(short, None, batch_size=8, wait_ms=30),
                       [("c", ["a", "b"], [False, False]), ("c", ["bad"], [False]), ("c", ["c"], [False])])
    assert [r.summary for r in results[0]] == ["A", "B"] and [r.summary for r in results[2]] == ["C"]
    assert isinstance(results[1][0], UserError)
    assert calls[0] == ["a", "b", "bad", "c"] and ["bad"] in calls[1:]      # one batch, then each request alone
    calls.clear()
    run_jobs(Scheduler(short, None, batch_size=8, wait_ms=30, enabled=False),
             [("c", ["a", "b"], [False, False]), ("c", ["bad"], [False]), ("c", ["c"], [False])])
    assert calls == [["a", "b"], ["bad"], ["c"]]                             # without micro-batching


def test_scheduler_takes_turns_between_clients():
    """A client that queued six dialogues first does not make the other two clients wait for them:
    batches are filled round robin across clients."""
    calls = []
    scheduler = Scheduler(lambda texts, d, s=None: calls.append(list(texts)) or fake_result(texts), None, batch_size=2,
                          wait_ms=0)
    run_jobs(scheduler, [("heavy", [f"h{i}" for i in range(6)], [False] * 6), ("b", ["b0"], [False]),
                         ("c", ["c0"], [False])])
    assert calls[0] == ["h0", "b0"] and calls[1] == ["c0", "h1"] and len(calls) == 4
    calls.clear()                                                            # FIFO would have served b0, c0 last
    run_jobs(Scheduler(lambda texts, d, s=None: calls.append(list(texts)) or fake_result(texts), None, batch_size=2,
                       wait_ms=0, enabled=False),
             [("heavy", [f"h{i}" for i in range(6)], [False] * 6), ("b", ["b0"], [False])])
    assert calls[0] == ["h0", "h1"] and calls[1] == ["b0"]                   # one request at a time, still in turns


def test_a_long_job_yields_its_turn_between_batches():
    """Short requests that arrive while a long job runs are served after the long job's current
    engine batch, not after the whole job."""
    order, late = [], []

    def long(job, texts, control):
        for k in range(5):
            control.check()
            control.run(lambda k=k: order.append(f"L{k}") or fake_result(["w"]))
            if k == 1:                                  # three clients arrive while the job runs
                for short_job in late:
                    scheduler.submit(short_job)
        return SimpleNamespace(summaries=["LONG"], truncated=[False], windows=[5], settings={})

    scheduler = Scheduler(lambda texts, d, s=None: order.append("+".join(texts)) or fake_result(texts), long,
                          batch_size=8,
                          wait_ms=0)

    def arrive_later(jobs):
        late.extend(jobs[1:])
    results = run_jobs(scheduler, [("heavy", ["x"], [True])] + [(f"s{i}", [f"s{i}"], [False]) for i in range(3)],
                       submit_first=1, before_start=arrive_later)
    assert results[0][0].summary == "LONG" and results[0][0].windows == 5
    assert order == ["L0", "L1", "s0+s1+s2", "L2", "L3", "L4"]


def test_cancelled_work_is_dropped_and_a_long_job_stops():
    calls, started = [], threading.Event()

    def long(job, texts, control):
        for k in range(100):
            control.check()
            control.run(lambda: calls.append("L") or started.set() or time.sleep(0.01) or fake_result(["w"]))
        return SimpleNamespace(summaries=["never"], truncated=[False], windows=[100], settings={})

    def cancel(jobs):
        jobs[1].cancel("client_left")                          # gone before its turn
        threading.Timer(0.3, lambda: jobs[0].cancel("deadline")).start()

    scheduler = Scheduler(lambda texts, d, s=None: calls.append(texts) or fake_result(texts), long,
                          batch_size=4, wait_ms=0)
    results = run_jobs(scheduler, [("a", ["long"], [True]), ("b", ["gone"], [False])], before_start=cancel)
    assert isinstance(results[0][0], Cancelled) and str(results[0][0]) == "deadline"
    assert isinstance(results[1][0], Cancelled) and ["gone"] not in calls
    assert 0 < calls.count("L") < 100 and scheduler.stats["cancelled"] == 1


def test_admission_refuses_when_closing_or_a_client_holds_too_much():
    scheduler = Scheduler(lambda texts, d, s=None: fake_result(texts), None, client_pending_tokens=100, max_pending=3)

    async def scenario():
        loop = asyncio.get_running_loop()
        decoding = Decoding(GenerationSettings())
        scheduler.submit(Job("a", ["x"], [False], decoding, loop, cost=80))
        with pytest.raises(Rejected, match="CLIENT_PENDING_TOKENS=100") as busy:
            scheduler.submit(Job("a", ["y"], [False], decoding, loop, cost=80))
        scheduler.submit(Job("b", ["z"], [False], decoding, loop, cost=80))   # another client is fine
        with pytest.raises(Rejected, match="MAX_PENDING=3") as full:
            scheduler.submit(Job("c", ["1", "2"], [False, False], decoding, loop))
        scheduler.stop(1)
        with pytest.raises(Rejected, match="shutting down") as closing:
            scheduler.submit(Job("d", ["w"], [False], decoding, loop))
        return busy.value.status, full.value.status, closing.value.status
    assert asyncio.run(scenario()) == (429, 503, 503)


def test_sampled_requests_run_alone():
    calls = []
    sampled = Decoding(GenerationSettings(), (("seed", 1), ("temperature", 0.7), ("top_p", 1.0)))
    run_jobs(Scheduler(lambda texts, d, s=None: calls.append(list(texts)) or fake_result(texts), None, batch_size=8,
                       wait_ms=0), [("a", ["a0"], [False]), ("b", ["b0"], [False])], decoding=sampled)
    assert sorted(calls) == [["a0"], ["b0"]]


def test_the_server_runs_a_ctranslate2_export(tiny_models, tmp_path):
    """The server codes against the backend protocol: a CTranslate2 folder serves /summarize and the
    OpenAI routes with the same summaries, and seeded sampling repeats."""
    pytest.importorskip("ctranslate2")
    from fastapi.testclient import TestClient
    from finetuneflow.serve.http_api import create_app
    from finetuneflow.serve.inference_io import load_for_inference
    from finetuneflow.serve.options import ServerOptions
    from finetuneflow.ship.ct2_export import convert_to_ct2
    folder = tmp_path / "ct2-bart"
    convert_to_ct2(tiny_models["bart"], folder, "float32")
    loaded = load_for_inference(str(folder), device="cpu")
    assert loaded.backend.name == "ctranslate2"
    with TestClient(create_app(loaded, ServerOptions(max_new_tokens=8))) as client:
        plain = client.post("/summarize", json={"dialogue": DIALOGUES[0]}).json()
        chat = client.post("/v1/chat/completions", json={"model": "ct2-bart", "messages": [
            {"role": "user", "content": DIALOGUES[0]}]}).json()
        assert chat["choices"][0]["message"]["content"] == plain["summary"] and plain["summary"]
        # CTranslate2 samples too (seeded: the same seed, the same text)
        body = {"model": "ct2-bart", "temperature": 0.7, "seed": 3,
                "messages": [{"role": "user", "content": DIALOGUES[0]}]}
        sampled = [client.post("/v1/chat/completions", json=body) for _ in range(2)]
        assert [r.status_code for r in sampled] == [200, 200]
        assert sampled[0].json()["choices"][0]["message"]["content"] == \
            sampled[1].json()["choices"][0]["message"]["content"]
        long = client.post("/summarize", json={"dialogue": LONG}).json()
        assert long["windows"][0] > 1 and long["summary"]


def test_a_request_may_ask_for_mbr_where_the_server_allows_it(tiny_models, tmp_path):
    """MBR_REQUESTS=True: "decoding": "mbr" in /summarize's generation or the OpenAI body (the ftf
    extension field) gets consensus decoding, per window for a long dialogue; a stream sends it as
    one delta; the same request gives the same summary; greedy stays the default."""
    running = start_server(tiny_models["llama"], tmp_path, *LIMITS, "--mbr_requests=true", "--mbr_samples=2",
                           env={"FTF_API_TOKEN": TOKEN}, name="mbr")
    try:
        info = httpx.get(f"{running.url}/info", headers=AUTH).json()
        assert info["mbr"]["requests_allowed"] is True and "one delta" in info["mbr"]["streaming"]
        assert info["effective_defaults"]["decoding"] == "greedy"
        asked = {"dialogues": DIALOGUES[:2], "generation": {"decoding": "mbr"}}
        first, again = post(running, asked).json(), post(running, asked).json()
        assert first["generation"]["decoding"] == "mbr" and first["generation"]["mbr_samples"] == 2
        assert first["summaries"] == again["summaries"]
        assert post(running, {"dialogue": DIALOGUES[0]}).json()["generation"]["decoding"] == "greedy"
        long = post(running, {"dialogue": LONG, "generation": {"decoding": "mbr"}}).json()
        assert long["windows"][0] > 1 and long["generation"]["decoding"] == "mbr"
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
                "model": "tiny-llama", "stream": True, "decoding": "mbr",
                "messages": [{"role": "user", "content": DIALOGUES[0]}]}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: {")]
        deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events]
        assert len([d for d in deltas if d]) == 1
    finally:
        running.stop()
