"""What the HTTP routes share (routes.py, openai_api.py) and the app that holds them (http_api.py):
the one error shape, the notes a route leaves for its access-log line, whose turn a request waits
in, and server-sent events.

Every error is one JSON object in the OpenAI error shape:

    {"error": {"message": "...", "type": "invalid_request_error", "code": "dialogue_too_long", "param": null}}
"""
from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else (
        {"Retry-After": "1"} if status in (429, 503) and code != "token_budget_spent" else None)
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def note(request_or_scope, **fields) -> None:
    """Facts about the request for its access-log line (tokens, windows, the error code)."""
    scope = request_or_scope.scope if hasattr(request_or_scope, "scope") else request_or_scope
    scope.setdefault("state", {}).setdefault("ftf", {}).update(fields)


def client_key(request: Request, user: str | None = None) -> str:
    """Whose turn a request waits in: the client address, refined by an OpenAI `user` or an
    X-Client-Id header (behind a proxy every client shares one address)."""
    host = request.client.host if request.client else "?"
    return f"{host}/{(user or request.headers.get('x-client-id') or '')[:64]}"


def sse(data, event: str | None = None) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
