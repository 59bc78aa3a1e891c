"""serve_api.py started for real (uvicorn on 127.0.0.1, a free port) with a tiny Llama adapter and
driven with httpx: good requests, every limit as a 4xx JSON error, bearer-token auth, docs, and a
burst of 200 concurrent requests that are micro-batched with results equal to single requests.
Plus the micro-batcher's failure isolation, in process."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest

from conftest import OFFLINE_ENV, REPO, SAMPLES
from tests.adapters import make_adapter

from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import GenerationSettings
from finetuneflow.serve.serving import MicroBatcher

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ["--max_dialogues=4", "--max_chars=3000", "--max_body_bytes=20000", "--max_new_tokens_limit=32",
          "--max_beams=4", "--max_new_tokens=8", "--batch_wait_ms=20", "--batch_size=8"]
DIALOGUES = [json.loads(line)["dialogue"] for line in SAMPLES.read_text(encoding="utf-8").splitlines()[:6]]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    adapter = make_adapter(tiny_models["llama"], root / "lora", max_input_length=512)
    log_path = root / "server.log"
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root), "FTF_API_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "serve_api.py"), f"--model={adapter}", "--port=0",
                                    *LIMITS], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url, deadline = None, time.time() + 300
        while time.time() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited {process.returncode}:\n{log_path.read_text()}")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            if found:
                url = found.group(1)
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"server did not start:\n{log_path.read_text()}")
        yield SimpleNamespace(url=url, log=log_path)
    finally:
        process.terminate()
        process.wait(timeout=60)


def post(server, body=None, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/summarize", json=body, headers=headers, timeout=120, **kwargs)


def test_health_info_docs_and_auth(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"      # open for probes
    assert httpx.get(f"{server.url}/info").status_code == 401
    info = httpx.get(f"{server.url}/info", headers=AUTH).json()
    assert info["family"] == "causal" and info["adapter"] and info["auth_required"] is True
    assert info["limits"]["max_dialogues"] == 4 and info["defaults"]["max_new_tokens"] == 8
    assert info["max_input_length"] == 512 and info["long_input"] == "chunk"
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/summarize"]["post"]["requestBody"]
    assert {"dialogue", "dialogues", "generation"} <= set(
        schema["content"]["application/json"]["schema"]["properties"])


def test_good_requests(server):
    one = post(server, {"dialogue": DIALOGUES[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["summary"] == body["summaries"][0] and body["truncated"] == [False]
    assert body["generation"]["max_new_tokens"] == 8
    many = post(server, {"dialogues": DIALOGUES[:3], "generation": {"max_new_tokens": 4, "num_beams": 2}}).json()
    assert len(many["summaries"]) == 3 and "summary" not in many
    assert many["generation"]["max_new_tokens"] == 4 and many["generation"]["num_beams"] == 2
    long = post(server, {"dialogue": "\n".join(DIALOGUES)[:2990]}).json()     # > 512 tokens: summarized in windows
    assert long["chunked"] == [True] and long["truncated"] == [False]


@pytest.mark.parametrize("body, headers, status, code", [
    ({"dialogue": "a: hi"}, {}, 401, "unauthorized"),
    ({"dialogue": "a: hi"}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
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
    ({"dialogue": "x" * 25_000}, AUTH, 413, "body_too_large"),
])
def test_limits_are_4xx_json(server, body, headers, status, code):
    if isinstance(body, bytes):
        response = httpx.post(f"{server.url}/summarize", content=body, headers=headers, timeout=60)
    else:
        response = post(server, body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_chunked_body_over_the_limit_and_wrong_routes(server):
    stream = (b"x" * 5000 for _ in range(5))          # no Content-Length: counted while read
    response = httpx.post(f"{server.url}/summarize", content=stream, headers=AUTH, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{server.url}/summarize").json()["error"]["code"] == "http_405"
    assert httpx.get(f"{server.url}/nowhere").json()["error"]["code"] == "http_404"


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


def test_micro_batcher_isolates_a_failing_request():
    calls = []

    def run(dialogues, settings):
        calls.append(list(dialogues))
        if "bad" in dialogues:
            raise UserError("bad dialogue")
        return SimpleNamespace(summaries=[d.upper() for d in dialogues], truncated=[False] * len(dialogues),
                               windows=[1] * len(dialogues), settings={})

    async def scenario(enabled: bool):
        batcher = MicroBatcher(run, batch_size=8, wait_ms=30, enabled=enabled)
        batcher.start()
        settings = GenerationSettings()
        results = await asyncio.gather(batcher.submit(["a", "b"], settings), batcher.submit(["bad"], settings),
                                       batcher.submit(["c"], settings), return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario(True))
    assert [r[0] for r in results[0]] == ["A", "B"] and [r[0] for r in results[2]] == ["C"]
    assert isinstance(results[1], UserError)
    assert calls[0] == ["a", "b", "bad", "c"] and ["bad"] in calls[1:]      # one batch, then each request alone
    calls.clear()
    asyncio.run(scenario(False))
    assert calls == [["a", "b"], ["bad"], ["c"]]                             # without micro-batching
