"""The faithfulness checks on the server's answers (`ftf.checks`), in-process with a scripted
backend whose summary invents a name ("Ben"): the flagged span with its offsets in the JSON
answer, the OpenAI answer and the last event of a stream; meetings get no flags and say so; a
check that fails inside still returns the summary with `ftf.checks.error` (and logs it); CHECKS
off leaves them out; /metrics counts flagged summaries."""
from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from conftest import SAMPLES
from finetuneflow.serve.http_api import create_app
from finetuneflow.serve.options import ServerOptions
from serving_helpers import parse_sse
from tests.scripted import DIALOGUE, INVENTED, scripted_model

LONG = next(json.loads(line)["dialogue"] for line in SAMPLES.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["id"] == "sample-long-meeting")
OPTIONS = dict(max_new_tokens=32, checks_encoder="", batch_wait_ms=0)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return scripted_model(tiny_models["llama"])


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(loaded, ServerOptions(**OPTIONS))) as running:
        yield running


def ben(checks: dict) -> dict:
    start = INVENTED.index("Ben")
    assert checks["checked"] == ["unsupported_mentions", "unsupported_sentence"] and checks["flagged"] is True
    span = next(s for s in checks["spans"] if s["text"] == "Ben")
    assert (span["start"], span["end"], span["check"]) == (start, start + 3, "unsupported_mentions")
    assert span["label"] == "not in the dialogue" and span["why"] == "name not in the dialogue"
    assert checks["validation"]["unsupported_mentions"]["name_insert"] == 1.0
    assert checks["flags"]["unsupported_sentence"] is None and "CHECKS_ENCODER" in " ".join(checks["notes"])
    return span


def test_the_answer_marks_the_invented_name(client):
    answer = client.post("/summarize", json={"dialogue": DIALOGUE}).json()
    assert answer["summary"] == INVENTED
    ben(answer["ftf"]["checks"][0])
    chat = client.post("/v1/chat/completions", json={"model": "scripted", "messages": [
        {"role": "user", "content": DIALOGUE}]}).json()
    assert chat["choices"][0]["message"]["content"] == INVENTED
    ben(chat["ftf"]["checks"][0])
    metrics = client.get("/metrics").text
    assert 'ftf_flagged_summaries_total{check="unsupported_mentions"} 2.0' in metrics


def test_the_stream_carries_the_checks_in_its_last_event(client):
    with client.stream("POST", "/summarize?stream=true", json={"dialogue": DIALOGUE}) as response:
        events = parse_sse(response.iter_lines())
    deltas = [data["text"] for kind, data in events if kind == "delta"]
    summary = next(data for kind, data in events if kind == "summary")
    assert len(deltas) > 3 and "".join(deltas) == summary["summary"] == INVENTED
    ben(summary["checks"])
    with client.stream("POST", "/v1/chat/completions", json={"model": "scripted", "stream": True, "messages": [
            {"role": "user", "content": DIALOGUE}]}) as response:
        chunks = [data for kind, data in parse_sse(response.iter_lines()) if isinstance(data, dict)]
    last = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    ben(last["ftf"]["checks"])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == INVENTED


def test_a_meeting_gets_no_flags_and_says_so(client):
    assert len(LONG.split()) > 515
    checks = client.post("/summarize", json={"dialogue": LONG}).json()["ftf"]["checks"][0]
    assert checks["checked"] == [] and checks["spans"] == [] and checks["flagged"] is False
    assert "validated on dialogues of up to 515 words" in checks["skipped"]


def test_a_failing_check_still_returns_the_summary(client, monkeypatch, caplog):
    import finetuneflow.quality.faith_report as faith_report

    def broken(*args, **kwargs):
        raise ValueError("the checker broke")
    monkeypatch.setattr(faith_report, "check_summary", broken)
    with caplog.at_level(logging.ERROR, logger="finetuneflow.quality"):
        response = client.post("/summarize", json={"dialogue": DIALOGUE})
    assert response.status_code == 200 and response.json()["summary"] == INVENTED
    assert response.json()["ftf"]["checks"][0]["error"] == "ValueError: the checker broke"
    assert any("faithfulness check failed" in r.message for r in caplog.records)
    assert "ftf_check_errors_total 1.0" in client.get("/metrics").text
    bad = client.post("/summarize", json={"dialogue": ""})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "empty_dialogue"


def test_checks_off(loaded):
    with TestClient(create_app(loaded, ServerOptions(**{**OPTIONS, "checks": False}))) as client:
        answer = client.post("/summarize", json={"dialogue": DIALOGUE}).json()
        assert answer["summary"] == INVENTED and answer["ftf"]["checks"] == [None]
        assert client.get("/info").json()["checks"]["enabled"] is False
