"""Stage 8 - serve the model over HTTP: POST /summarize, GET /health, GET /info, docs at /docs.

Reads:  MODEL (clean merged folder from post_merge_cleanup.py, a merged or adapter folder, or a Hub id)
        $FTF_API_TOKEN (optional; when set, /summarize and /info need "Authorization: Bearer <token>")
Writes: nothing (uvicorn logs at LOG_LEVEL to stderr)

Run as:
    python serve_api.py                                   # http://127.0.0.1:8000/docs
    curl -s localhost:8000/summarize -H 'content-type: application/json' \
         -d '{"dialogue": "Anna: Lunch?\nTom: Sure.", "generation": {"max_new_tokens": 40}}'
Requests: {"dialogue": "..."} or {"dialogues": ["...", ...]}, optional "generation" overrides
(num_beams, max_new_tokens, min_new_tokens, no_repeat_ngram_size, length_penalty) within the limits
below. Concurrent requests are micro-batched: dialogues are collected for BATCH_WAIT_MS (or until
BATCH_SIZE) and generated together in one worker thread. Each limit breach is a 4xx JSON error.
"""
MODEL = "ft_outputs/bart_merged_clean"  # clean/merged model folder, adapter folder, or Hub id
BASE_MODEL = None                      # [str | None] adapter folders only: the base, when its recorded path is gone
HOST = "127.0.0.1"                     # bind address (loopback; 0.0.0.0 exposes the service: set a token)
PORT = 8000                            # [0 <= int <= 65535] TCP port (0: any free port, printed at start)
BATCH_SIZE = 8                         # [int >= 1] most dialogues generated together
BATCH_WAIT_MS = 10.0                   # [0 <= float <= 10000] how long to collect concurrent dialogues before generating (ms)
MICRO_BATCHING = True                  # False: one request at a time (for comparison)
MAX_BODY_BYTES = 1_000_000             # [int >= 1024] request body limit (bytes) -> 413
MAX_DIALOGUES = 16                     # [int >= 1] dialogues per request -> 422
MAX_CHARS = 20_000                     # [int >= 1] characters per dialogue -> 422
MAX_NEW_TOKENS_LIMIT = 256             # [int >= 1] the most new tokens a request may ask for -> 422
MAX_BEAMS = 8                          # [int >= 1] the most beams a request may ask for -> 422
MAX_PENDING = 1024                     # [int >= 1] dialogues waiting before new requests get 503
LONG_INPUT = "chunk"                   # [truncate | chunk | error] chunk, truncate or error for dialogues over MAX_INPUT_LENGTH tokens
MAX_INPUT_LENGTH = None                # [int >= 16 | None] tokens per model input; None: from run_config.json, else the model's limit
INSTRUCTION = None                     # [str | None] causal models' instruction; None: the one the model was trained with
NUM_BEAMS = None                       # [int >= 1 | None] default decoding settings; None: inherited from run_config.json
MAX_NEW_TOKENS = None                  # [int >= 1 | None] tokens; None: inherited
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None: inherited
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: inherited
LENGTH_PENALTY = None                  # [float | None] None: inherited
TOKEN_ENV = "FTF_API_TOKEN"            # environment variable holding the optional bearer token
DEVICE = None                          # [str | None] None: cuda when available, else cpu
LOG_LEVEL = "warning"                  # [critical | error | warning | info | debug | trace] uvicorn log level ("info" also logs every request)

import hmac
import json
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, replace

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException

from finetuneflow.contract.settings import configure
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.engine.generation import GenerationSettings
from finetuneflow.engine.long_input import input_limit, summarize_long
from finetuneflow.serve.serving import (ApiError, MicroBatcher, Overloaded, SummarizeRequest, bearer_token, error_response,
                                  inherit_defaults, inline_schema, load_for_inference, model_info, parse_request)


def create_app(loaded, cfg) -> FastAPI:
    defaults = GenerationSettings.from_config(cfg)
    token = bearer_token(cfg.TOKEN_ENV)
    run = lambda dialogues, settings: summarize_long(loaded, dialogues, settings, cfg.BATCH_SIZE,  # noqa: E731
                                                     cfg.MAX_INPUT_LENGTH, cfg.INSTRUCTION, mode=cfg.LONG_INPUT,
                                                     progress=False)
    batcher = MicroBatcher(run, cfg.BATCH_SIZE, cfg.BATCH_WAIT_MS, cfg.MICRO_BATCHING, cfg.MAX_PENDING)
    limits = {k.lower(): cfg[k] for k in ("MAX_BODY_BYTES", "MAX_DIALOGUES", "MAX_CHARS", "MAX_NEW_TOKENS_LIMIT",
                                          "MAX_BEAMS", "MAX_PENDING")}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="FineTuneFlow dialogue summarizer", lifespan=lifespan,
                  description="Summaries from the fine-tuned model. Limits: " + json.dumps(limits))

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):   # a bug, not bad input: still a JSON answer
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            raise ApiError(401, "unauthorized", f"send 'Authorization: Bearer <token>' (the token in ${cfg.TOKEN_ENV})")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"request body of {declared} bytes is over {cfg.MAX_BODY_BYTES}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.MAX_BODY_BYTES:
                raise ApiError(413, "body_too_large", f"request body is over {cfg.MAX_BODY_BYTES} bytes")
        return bytes(body)

    @app.post("/summarize", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(SummarizeRequest)}}}})
    async def summarize_endpoint(request: Request):
        """Summarize one dialogue ("dialogue") or several ("dialogues")."""
        authorize(request)
        parsed, overrides = parse_request(await read_body(request), limits)
        settings = replace(defaults, **overrides)
        start = time.perf_counter()
        try:
            results = await batcher.submit(parsed.dialogues, settings)
        except Overloaded as exc:
            return error_response(503, "overloaded", f"{exc}; retry shortly")
        except UserError as exc:
            return error_response(422, "unprocessable", str(exc))
        body = {"summaries": [r[0] for r in results], "truncated": [r[1] for r in results],
                "chunked": [r[2] > 1 for r in results], "generation": results[0][3],
                "seconds": round(time.perf_counter() - start, 4)}
        if parsed.dialogue is not None:   # the one-dialogue form also gets "summary"
            body["summary"] = body["summaries"][0]
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": len(batcher.pending)}

    @app.get("/info")
    async def info(request: Request):
        authorize(request)
        return {**model_info(loaded), "defaults": asdict(defaults), "instruction": cfg.INSTRUCTION,
                "max_input_length": input_limit(loaded, defaults, cfg.MAX_INPUT_LENGTH),
                "long_input": cfg.LONG_INPUT, "limits": limits,
                "batching": {"enabled": cfg.MICRO_BATCHING, "batch_size": cfg.BATCH_SIZE,
                             "wait_ms": cfg.BATCH_WAIT_MS, **batcher.stats},
                "auth_required": token is not None}

    return app


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    loaded = load_for_inference(cfg.MODEL, cfg.BASE_MODEL, cfg.DEVICE)
    inherit_defaults(cfg, loaded)
    app = create_app(loaded, cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.HOST else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.HOST, cfg.PORT))
    except OSError as exc:
        raise UserError(f"cannot listen on {cfg.HOST}:{cfg.PORT} ({exc.strerror}); choose another --PORT") from None
    port = sock.getsockname()[1]
    if cfg.HOST not in ("127.0.0.1", "localhost", "::1") and bearer_token(cfg.TOKEN_ENV) is None:
        print(f"warning: listening on {cfg.HOST} without a token; set ${cfg.TOKEN_ENV} to require one")
    print(f"serving {model_info(loaded)['model']} on http://{cfg.HOST}:{port} (docs: /docs)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=cfg.LOG_LEVEL)).run(sockets=[sock])
    return {"port": port}


if __name__ == "__main__":
    run_cli(main)
