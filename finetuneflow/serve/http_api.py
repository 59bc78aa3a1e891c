"""The HTTP service: the error handlers, the middlewares and `create_app`, which builds the app from
the routers (routes.py: the service's own routes; openai_api.py: the OpenAI-compatible ones) and
the helpers they share (http_common.py: the error shape, request notes, client keys, server-sent
events).

Routes: POST /summarize (?stream=true for server-sent events), GET /health
(always open), GET /info, GET /metrics (Prometheus), GET / (the page), GET /samples, /docs.

Every error, whatever raised it (a limit, a budget, FastAPI's own validation, an unknown route,
a bug), is one JSON object in the OpenAI error shape:

    {"error": {"message": "...", "type": "invalid_request_error", "code": "dialogue_too_long", "param": null}}

Middlewares, outermost first: the access log (one JSON line per request, and the request metrics),
the bearer token (every route but /health when $FTF_API_TOKEN is set; constant-time comparison;
browsers may send it as the password of HTTP Basic auth), and the body limit (413 past
MAX_BODY_BYTES, counted while the body is read; the body is always read as JSON).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from finetuneflow.contract.paths import BUNDLED_SAMPLES
from finetuneflow.model.loading import LoadedModel
from finetuneflow.serve.batching import Rejected
from finetuneflow.serve.http_common import error_response, note
from finetuneflow.serve.openai_api import openai_router
from finetuneflow.serve.options import ServerOptions
from finetuneflow.serve.routes import summarize_router
from finetuneflow.serve.service import ClientLeft, Service

STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/health",)
PAGE_PATHS = ("/", "/docs", "/redoc")
KNOWN_ROUTES = ("/", "/health", "/info", "/metrics", "/samples", "/summarize", "/docs", "/openapi.json",
                "/v1/models", "/v1/chat/completions", "/v1/completions")
access_log = logging.getLogger("finetuneflow.access")


# --- the error handlers --------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Rejected):
        note(request, code=exc.code)
        return error_response(exc.status, exc.code, str(exc), exc.param)

    @app.exception_handler(ClientLeft)
    async def client_left(request: Request, exc: ClientLeft):
        note(request, code="client_left", client_stayed=False)
        return Response(status_code=499)       # nobody reads it; the access log shows 499

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            note(request, code="malformed_json")
            return error_response(400, "malformed_json", f"the body is not valid JSON: {reason}")
        where = ".".join(location) or "body"
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if where == "body" and first.get("type") == "value_error" and "=" in message.split(" ")[0]:
            where = message.split("=")[0]           # a model validator naming its field ("n=3 is not ...")
        note(request, code="invalid_request")
        return error_response(422, "invalid_request", f"{where}: {message}", where)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        note(request, code=f"http_{exc.status_code}")
        return error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):   # a bug, not bad input: still a JSON answer
        logging.getLogger("finetuneflow.serve").error("unhandled error", exc_info=exc)
        note(request, code="internal_error")
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed on this request")


# --- middlewares (plain ASGI) ----------------------------------------------------------------
async def send_error(send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    response = error_response(status, code, message)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    await response({"type": "http"}, None, send)


class BodyLimit:
    """413 past `limit` bytes (declared or counted while read); the body is replayed to the app
    and always read as JSON (curl -d sends form-urlencoded)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            note(scope, code="body_too_large")
            return await send_error(send, 413, "body_too_large", f"request body of {int(declared)} bytes is over "
                                                                 f"{self.limit} (MAX_BODY_BYTES)")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                note(scope, code="body_too_large")
                return await send_error(send, 413, "body_too_large", f"request body is over {self.limit} bytes "
                                                                     f"(MAX_BODY_BYTES)")
            if not message.get("more_body"):
                break
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if not content_type.endswith(b"json"):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


def token_matches(header: str, token: str) -> bool:
    """`Bearer <token>`, or HTTP Basic with the token as the password; constant-time comparison."""
    scheme, _, value = header.partition(" ")
    given = value.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


class BearerAuth:
    def __init__(self, app, token: str | None, token_env: str):
        self.app, self.token, self.token_env = app, token, token_env

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if token_matches(header, self.token):
            return await self.app(scope, receive, send)
        note(scope, code="unauthorized")
        challenge = {"WWW-Authenticate": 'Basic realm="FineTuneFlow", charset="UTF-8"'} \
            if scope["path"] in PAGE_PATHS else None
        await send_error(send, 401, "unauthorized", f"send 'Authorization: Bearer <token>' (the token in "
                                                    f"${self.token_env})", challenge)


class AccessLog:
    """One JSON line per request (client, method, path, status, ms, request id and what the route
    noted), the request metrics, and an x-request-id header."""

    def __init__(self, app, service: Service, enabled: bool):
        self.app, self.service, self.enabled = app, service, enabled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": 500}
        request_id = "req-" + secrets.token_hex(6)
        note(scope, request_id=request_id)

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.record(scope, status["code"], time.perf_counter() - start)

    def record(self, scope, status: int, seconds: float) -> None:
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "/static" if path.startswith("/static/") else \
            "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        facts = scope.get("state", {}).get("ftf", {})
        self.service.metrics.request(route, status, seconds, facts.get("code"))
        if self.enabled:
            client = scope.get("client") or ("?", 0)
            access_log.info(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client": client[0],
                                        "method": scope["method"], "path": path, "status": status,
                                        "ms": round(seconds * 1000, 1), **facts}, ensure_ascii=False))


# --- the app -------------------------------------------------------------------------------
def create_app(loaded: LoadedModel, options: ServerOptions | dict) -> FastAPI:
    """The FastAPI app serving `loaded` with `options` (typed server settings, or serve_api.py's
    resolved settings dict)."""
    if not isinstance(options, ServerOptions):
        options = ServerOptions.from_config(options)
    service = Service(loaded, options)

    @asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        import asyncio
        await asyncio.to_thread(service.scheduler.stop, options.shutdown_timeout_s)

    app = FastAPI(title="FineTuneFlow dialogue summarizer", lifespan=lifespan, version="2",
                  description="Summaries from the fine-tuned model, with the prompt and decoding settings it was "
                              "evaluated with. OpenAI-compatible endpoints under /v1. Limits: "
                              + json.dumps(options.limits()))
    app.state.service = service
    install_error_handlers(app)
    app.include_router(summarize_router(service))
    app.include_router(openai_router(service))
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/samples", summary="Bundled sample dialogues (for the page)")
    async def samples():
        if not BUNDLED_SAMPLES.is_file():
            return {"samples": []}
        rows = [json.loads(line) for line in BUNDLED_SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {"samples": [{"id": r.get("id"), "dialogue": r.get("dialogue")} for r in rows
                            if isinstance(r, dict) and r.get("dialogue")]}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(BearerAuth, token=options.token(), token_env=options.token_env)
    app.add_middleware(AccessLog, service=service, enabled=options.access_log)
    return app
