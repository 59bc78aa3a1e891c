"""The service's own routes: POST /summarize (JSON, or server-sent events with ?stream=true),
GET /health, GET /info and GET /metrics.

The JSON answer has "ftf": {"checks": [one per dialogue]}: the faithfulness checks of each
summary (quality/faith_report.py; null when CHECKS=False).

/summarize?stream=true sends, as `event: <type>` + `data: <json>` (the type is also in the data):

    start    {"type": "start", "id", "model", "dialogues": n, "windows": [estimated windows per dialogue],
              "generation": {effective decoding settings}, "max_input_length"}
    part     {"type": "part", "dialogue": i, "level": 0, "part": 2, "parts": 5, "summary": "...",
              "seconds"}   one per finished window of a long dialogue (level 1+: combining partials)
    part_delta {"type": "part_delta", "dialogue": i, "level", "part", "parts", "text": "..."}   the next
              piece of a window's summary as it is generated (before that window's "part" event)
    delta    {"type": "delta", "dialogue": i, "text": "..."}   the next piece of a summary as its tokens
              are generated (UTF-8 safe; a dialogue's deltas add up to exactly its "summary")
    summary  {"type": "summary", "dialogue": i, "summary", "truncated", "windows", "finish_reason",
              "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}, "seconds",
              "checks": {...}}   the whole summary, and its faithfulness checks (ftf.checks)
    done     {"type": "done", "summaries": [...], "usage": {...}, "seconds", "tokens_per_s"}
    error    {"type": "error", "error": {"message", "type", "code", "param"}}   (then the stream ends)
"""
from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetuneflow.serve.batching import Rejected, Result
from finetuneflow.serve.http_common import SSE_HEADERS, client_key, error_body, note, sse
from finetuneflow.serve.service import ClientLeft, Service


class Generation(BaseModel):
    """Decoding overrides for one request (unset = the service's defaults, the evaluated ones)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    num_beams: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    length_penalty: float | None = Field(None, ge=-10, le=10)
    decoding: Literal["greedy", "beam", "mbr"] | None = Field(
        None, description="greedy, beam (num_beams > 1) or mbr (consensus decoding, where the server allows it: "
                          "MBR_REQUESTS; not token-streamed, one delta)")


class SummarizeRequest(BaseModel):
    """POST /summarize: exactly one of "dialogue" or "dialogues"."""
    model_config = ConfigDict(extra="forbid", strict=True)
    dialogue: str | None = Field(None, description="one dialogue, turns separated by newlines")
    dialogues: list[str] | None = Field(None, description="several dialogues")
    generation: Generation | None = Field(None, description="decoding overrides for this request")

    @model_validator(mode="after")
    def one_form(self):
        if (self.dialogue is None) == (self.dialogues is None):
            raise ValueError('give exactly one of "dialogue" or "dialogues"')
        return self


def usage(results: list[Result]) -> dict:
    prompt = sum(r.input_tokens for r in results)
    completion = sum(r.generated for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def summarize_router(service: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/summarize", summary="Summarize one dialogue or several",
                 responses={200: {"description": "summaries (JSON), or server-sent events with ?stream=true"}})
    async def summarize_endpoint(body: SummarizeRequest, request: Request, stream: bool = False):
        """Summarize one dialogue ("dialogue") or several ("dialogues") with the evaluated settings,
        or the "generation" overrides within the limits. ?stream=true: server-sent events (see /docs
        of the project: start, part, summary, done, error)."""
        dialogues = body.dialogues if body.dialogues is not None else [body.dialogue]
        overrides = body.generation.model_dump(exclude_none=True) if body.generation else {}
        decoding = service.decoding(overrides)
        start = time.perf_counter()
        job, plan = await service.admit(dialogues, decoding, client_key(request), stream=stream)
        note(request, dialogues=len(dialogues), windows=sum(plan.windows), cost=plan.cost)
        if stream:
            head = {"type": "start", "id": f"sum-{job.id}", "model": service.model_id, "dialogues": len(dialogues),
                    "windows": plan.windows, "max_input_length": plan.limit,
                    "generation": {k: v for k, v in service.runner_effective(decoding).items() if k != "backend"}}
            return StreamingResponse(summarize_events(service, job, request, head, start),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await service.results(job, request.is_disconnected)
        seconds = time.perf_counter() - start
        answer = {"summaries": [r.summary for r in results], "truncated": [r.truncated for r in results],
                  "chunked": [r.windows > 1 for r in results], "windows": [r.windows for r in results],
                  "finish_reasons": [r.finish_reason for r in results], "generation": results[0].settings,
                  "usage": usage(results), "seconds": round(seconds, 4), "ftf": {"checks": [r.checks for r in results]}}
        if body.dialogue is not None:   # the one-dialogue form also gets "summary"
            answer["summary"] = answer["summaries"][0]
        note(request, completion_tokens=answer["usage"]["completion_tokens"], client_stayed=True)
        return answer

    @router.get("/health", summary="Liveness (never needs the token)")
    async def health():
        closing = service.scheduler.closing
        body = {"status": "shutting_down" if closing else "ok", "pending": service.scheduler.queued,
                "active": service.scheduler.active_jobs}
        return JSONResponse(body, status_code=503 if closing else 200)

    @router.get("/info", summary="The model, its prompt and defaults, the limits, batching counters")
    async def info():
        options = service.options
        return {**service.describe(), "auth_required": options.token() is not None,
                "batching": {"enabled": options.micro_batching, "batch_size": options.batch_size,
                             "wait_ms": options.batch_wait_ms, **service.scheduler.stats}}

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        data, content_type = service.metrics.render()
        return Response(data, media_type=content_type)

    return router


async def summarize_events(service: Service, job, request: Request, head: dict, start: float):
    """The events of /summarize?stream=true; the access log hears how many deltas went out and
    whether the client stayed to the end."""
    counts = {"streamed": 0, "stayed": False}
    try:
        async for event in _events(service, job, request, head, start, counts):
            yield event
    finally:
        note(request, streamed=counts["streamed"], client_stayed=counts["stayed"])
        if not counts["stayed"]:
            note(request, code="client_left")


async def _events(service: Service, job, request: Request, head: dict, start: float, counts: dict):
    yield sse(head, "start")
    results: dict[int, Result] = {}
    sent: dict[int, str] = {}
    try:
        async for kind, value in service.events(job, request.is_disconnected):
            seconds = round(time.perf_counter() - start, 4)
            if kind == "delta":
                sent[value.dialogue] = sent.get(value.dialogue, "") + value.text
                counts["streamed"] += 1
                yield sse({"type": "delta", "dialogue": value.dialogue, "text": value.text}, "delta")
                continue
            if kind == "part_delta":
                where = value.part
                yield sse({"type": "part_delta", "dialogue": value.dialogue, "level": where.level, "part": where.part,
                           "parts": where.parts, "text": value.text}, "part_delta")
                continue
            if kind == "part":
                yield sse({"type": "part", "dialogue": value.dialogue, "level": value.level, "part": value.part,
                           "parts": value.parts, "summary": value.summary, "seconds": seconds}, "part")
                continue
            index, result = value
            results[index] = result
            rest = result.summary[len(sent.get(index, "")):]
            if rest and result.summary.startswith(sent.get(index, "")):
                sent[index] = result.summary
                counts["streamed"] += 1
                yield sse({"type": "delta", "dialogue": index, "text": rest}, "delta")
            yield sse({"type": "summary", "dialogue": index, "summary": result.summary,
                       "truncated": result.truncated, "windows": result.windows,
                       "finish_reason": result.finish_reason, "usage": usage([result]), "seconds": seconds,
                       "checks": result.checks}, "summary")
    except Rejected as exc:
        counts["stayed"] = True
        note(request, code=exc.code)
        yield sse({"type": "error", **error_body(exc.status, exc.code, str(exc))}, "error")
        return
    except ClientLeft:
        return
    counts["stayed"] = True
    ordered = [results[i] for i in sorted(results)]
    seconds = time.perf_counter() - start
    total = usage(ordered)
    yield sse({"type": "done", "summaries": [r.summary for r in ordered], "usage": total,
               "seconds": round(seconds, 4),
               "tokens_per_s": round(total["completion_tokens"] / seconds, 2) if seconds else 0.0}, "done")


__all__ = ["summarize_router", "usage"]
