"""OpenAI-compatible endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

The model summarizes: a chat request's last user message (a completion request's prompt) is the
dialogue, and the server wraps it in the same instruction and prompt the model was trained and
evaluated with (/v1/models says which), unless the request sets `raw_prompt: true`. Requests go
through the same micro-batcher, limits and budgets as /summarize.

* `temperature` 0 or absent: the decoding settings the model was evaluated with (greedy or beam
  search), the same summary /summarize gives; > 0: sampling (seeded with `seed`) with `top_p`.
* `decoding` (an ftf extension): "greedy", "beam" or "mbr" (consensus decoding: the greedy summary
  and MBR_SAMPLES samples, the one agreeing most with the others; only where the server allows it,
  MBR_REQUESTS, or it is the default). An MBR summary is chosen once every candidate is done, so a
  stream sends it as one content delta (no token streaming).
* `max_tokens` (or `max_completion_tokens`) caps the new tokens (1..MAX_NEW_TOKENS_LIMIT).
* `stop`: up to 4 strings; the text is cut before the first one (finish_reason "stop").
* `usage` counts every model call (a long dialogue's windows too); `finish_reason` is "stop" or
  "length".
* `ftf.checks` (an ftf extension, one per choice; CHECKS=True): the shipped faithfulness checks of
  the summary against the dialogue (quality/faith_report.py): flagged spans with character
  offsets, the checks' names and validation numbers; `error` when a check failed inside (the
  summary is still returned); dialogues longer than the checks were validated for: `skipped`.
* `stream: true`: server-sent events of `chat.completion.chunk` / `text_completion` objects and
  `data: [DONE]`. A summary's text comes as content deltas as its tokens are generated (inside
  the micro-batch: each row of a batch streams its own; UTF-8 safe; the deltas add up to exactly
  the non-streamed text, `stop` strings applied), then its finish reason with the extension
  `"ftf": {"type": "summary", "checks": {...}}` (the checks, as in the non-streamed `ftf.checks`);
  `stream_options.include_usage` adds the usage chunk. A long dialogue first streams each
  window's summary as chunks with an empty delta and `"ftf": {"type": "part_delta", "part",
  "parts", "level", "text"}`, then one chunk per finished window with `"ftf": {"type": "part",
  "part": 2, "parts": 5, "level": 0, "summary": "..."}`. Beam search and MBR summaries are final
  only when done: their text comes as one delta.

Not supported (refused with a 422 naming the field, unless at its default): n > 1, tools,
logprobs, logit_bias, presence/frequency penalties, best_of, echo, suffix, non-text content.
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetuneflow.serve.batching import Rejected, Result
from finetuneflow.serve.http_common import SSE_HEADERS, client_key, error_body, note, sse
from finetuneflow.serve.service import ClientLeft, Service
from finetuneflow.serve.streams import StopCut

# field -> the values that mean "not used"; anything else is refused
UNSUPPORTED = {"n": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
               "parallel_tool_calls": (None, True, False), "best_of": (None, 1), "echo": (None, False),
               "suffix": (None, "")}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")     # name, tool_call_id, ...
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the id GET /v1/models lists")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (1..MAX_NEW_TOKENS_LIMIT)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: the evaluated decoding; > 0 samples")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="repeatable sampling")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="the end user; requests of different users take turns")
    raw_prompt: bool = Field(False, description="send the text without the trained summary instruction/prefix")
    decoding: Literal["greedy", "beam", "mbr"] | None = Field(
        None, description="ftf extension: greedy, beam or mbr (consensus decoding, where the server allows it; "
                          "MBR answers are not token-streamed: one delta); absent: the server's default")
    metadata: dict | None = None
    store: bool | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def supported(self):
        for name, fine in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value not in fine:
                raise ValueError(f"{name}={value!r} is not supported by this summarization server")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, description="the last user message is the dialogue")
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(description="a dialogue, or a list of dialogues (one choice each)")


def cut_at_stop(text: str, stops: list[str], reason: str) -> tuple[str, str]:
    """The text before the first stop string, and the finish reason."""
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], "stop") if hits else (text, reason)


def last_user_message(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        parts = message.content or []
        if any(p.type != "text" for p in parts):
            raise Rejected(422, "unsupported_content", "only text content is supported (the message has "
                                                       f"{', '.join(sorted({p.type for p in parts}))})", "messages")
        return "\n".join(p.text or "" for p in parts)
    raise Rejected(422, "no_user_message", "messages has no user message: the last user message is the dialogue "
                                           "to summarize", "messages")


class _Call:
    """One OpenAI request on its way through the service."""

    def __init__(self, service: Service, body: _Common, request: Request, chat: bool, texts: list[str]):
        self.service, self.body, self.request, self.chat, self.texts = service, body, request, chat, texts
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.start = time.perf_counter()
        self.streamed = 0           # content chunks sent
        self.left = False           # the client hung up

    def check_model(self) -> None:
        service = self.service
        if self.body.model not in (service.model_id, service.info["model"]):
            raise Rejected(404, "model_not_found", f"the model {self.body.model!r} does not exist here; "
                                                   f"GET /v1/models lists {service.model_id!r}", "model")

    def decoding(self):
        body, options = self.body, self.service.options
        new = body.max_completion_tokens or body.max_tokens
        if new is not None and new > options.max_new_tokens_limit:
            raise Rejected(422, "max_tokens_too_large", f"max_tokens {new} is over the limit "
                                                        f"{options.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)",
                           "max_tokens")
        sampling = None
        if body.temperature:
            sampling = {"temperature": float(body.temperature), "top_p": float(body.top_p or 1.0), "seed": body.seed}
        prompt = ("raw_chat" if self.chat else "raw_text") if body.raw_prompt else "summary"
        overrides = {"max_new_tokens": new} if new else {}
        if body.decoding:
            overrides["decoding"] = body.decoding
        return self.service.decoding(overrides, sampling, prompt)

    async def admit(self):
        self.check_model()
        decoding = self.decoding()
        what = "message" if self.chat else "prompt"
        job, plan = await self.service.admit(self.texts, decoding, client_key(self.request, self.body.user),
                                             stream=self.body.stream, what=what)
        note(self.request, dialogues=len(self.texts), windows=sum(plan.windows), cost=plan.cost)
        return job

    def choice(self, index: int, result: Result) -> dict:
        text, reason = cut_at_stop(result.summary, self.body.stops(), result.finish_reason or "stop")
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                    "logprobs": None}
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

    def envelope(self, **fields) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.service.model_id,
                "system_fingerprint": f"ftf-{self.service.loaded.backend.name}", **fields}

    def answer(self, results: list[Result]) -> dict:
        prompt = sum(r.input_tokens for r in results)
        completion = sum(r.generated for r in results)
        return self.envelope(
            choices=[self.choice(i, r) for i, r in enumerate(results)],
            usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            ftf={"windows": [r.windows for r in results], "truncated": [r.truncated for r in results],
                 "generation": results[0].settings, "seconds": round(time.perf_counter() - self.start, 4),
                 "checks": [r.checks for r in results]})

    # -- streaming ------------------------------------------------------------------------------
    def chunk(self, index: int, delta: dict | str | None, reason: str | None, **extra) -> str:
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": reason, "logprobs": None}
        return sse(self.envelope(object=self.object + (".chunk" if self.chat else ""), choices=[choice], **extra))

    async def stream(self, job):
        """The request's server-sent events; the access log hears how many content chunks went out
        and whether the client stayed to the end."""
        stayed = False
        try:
            async for event in self.events(job):
                yield event
            stayed = not self.left
        finally:
            note(self.request, streamed=self.streamed, client_stayed=stayed)
            if not stayed:
                note(self.request, code="client_left")

    async def events(self, job):
        body, results, cuts = self.body, {}, {i: StopCut(self.body.stops()) for i in range(len(self.texts))}
        if self.chat:
            for index in range(len(self.texts)):
                yield self.chunk(index, {"role": "assistant", "content": ""}, None)
        try:
            async for kind, value in self.service.events(job, self.request.is_disconnected):
                if kind == "part":
                    part = {"type": "part", "part": value.part, "parts": value.parts, "level": value.level,
                            "summary": value.summary}
                    yield self.chunk(value.dialogue, None, None, ftf=part)
                elif kind == "part_delta":
                    where = value.part
                    yield self.chunk(value.dialogue, None, None, ftf={
                        "type": "part_delta", "part": where.part, "parts": where.parts, "level": where.level,
                        "text": value.text})
                elif kind == "delta":
                    text = cuts[value.dialogue].push(value.text)
                    if text:
                        self.streamed += 1
                        yield self.chunk(value.dialogue, {"content": text} if self.chat else text, None)
                else:
                    index, result = value
                    results[index] = result
                    for event in self.finish_choice(index, result, cuts[index]):
                        yield event
        except Rejected as exc:
            note(self.request, code=exc.code)
            yield sse(error_body(exc.status, exc.code, str(exc), exc.param))
            return
        except ClientLeft:
            self.left = True
            return
        note(self.request, completion_tokens=sum(r.generated for r in results.values()))
        if body.stream_options and body.stream_options.include_usage:
            ordered = [results[i] for i in sorted(results)]
            prompt, completion = sum(r.input_tokens for r in ordered), sum(r.generated for r in ordered)
            yield sse(self.envelope(object=self.object + (".chunk" if self.chat else ""), choices=[],
                                    usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                           "total_tokens": prompt + completion}))
        yield sse("[DONE]")

    def finish_choice(self, index: int, result: Result, cut: StopCut):
        """The rest of a choice's text (what its streamed pieces did not carry yet), then its finish."""
        choice = self.choice(index, result)
        rest = cut.finish(choice["message"]["content"] if self.chat else choice["text"])
        if rest:
            self.streamed += 1
            yield self.chunk(index, {"content": rest} if self.chat else rest, None)
        extension = {"type": "summary", "windows": result.windows, "truncated": result.truncated}
        if result.checks is not None:
            extension["checks"] = result.checks
        yield self.chunk(index, {} if self.chat else "", choice["finish_reason"], ftf=extension)


def openai_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": int(service.started), "owned_by": "finetuneflow",
                "ftf": service.describe()}

    @router.get("/models", summary="The served model, with its training prompt and defaults in 'ftf'")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model_id:path}", summary="One model")
    async def model(model_id: str):
        if model_id not in (service.model_id, service.info["model"]):
            raise Rejected(404, "model_not_found", f"the model {model_id!r} does not exist here; GET /v1/models "
                                                   f"lists {service.model_id!r}", "model")
        return model_card()

    async def run(call: _Call):
        job = await call.admit()
        if call.body.stream:
            return StreamingResponse(call.stream(job), media_type="text/event-stream", headers=SSE_HEADERS)
        results = await service.results(job, call.request.is_disconnected)
        answer = call.answer(results)
        note(call.request, completion_tokens=answer["usage"]["completion_tokens"], client_stayed=True)
        return answer

    @router.post("/chat/completions", summary="Summarize the last user message (OpenAI chat format)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.response_format not in (None, {"type": "text"}):
            raise Rejected(422, "unsupported_parameter", "response_format other than text is not supported",
                           "response_format")
        return await run(_Call(service, body, request, True, [last_user_message(body.messages)]))

    @router.post("/completions", summary="Summarize the prompt (OpenAI completions format)")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        return await run(_Call(service, body, request, False, prompts))

    return router
