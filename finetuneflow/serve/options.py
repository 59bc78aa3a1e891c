"""The server's settings as one typed object (the settings block of serve_api.py, lower-cased)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from finetuneflow.contract.decoding import MBR_FIELDS, DecodingFields, GenerationSettings
from finetuneflow.contract.settings import FromConfig


@dataclass(frozen=True)
class ServerOptions(FromConfig, DecodingFields):
    """Limits, budgets, batching and operations of the HTTP server, and (DecodingFields) the
    decoding a request gets unless it overrides it."""
    host: str = "127.0.0.1"
    port: int = 8000
    batch_size: int = 8
    batch_wait_ms: float = 10.0
    micro_batching: bool = True
    max_body_bytes: int = 1_000_000
    max_dialogues: int = 16
    max_chars: int = 20_000
    max_new_tokens_limit: int = 256
    max_beams: int = 8
    max_pending: int = 1024
    request_token_budget: int = 100_000
    request_timeout_s: float = 120.0
    client_pending_tokens: int = 200_000
    shutdown_timeout_s: float = 30.0
    long_input: str = "chunk"
    max_input_length: int | None = None
    instruction: str | None = None
    model_id: str | None = None
    token_env: str = "FTF_API_TOKEN"
    access_log: bool = True
    log_level: str = "warning"
    mbr_requests: bool = False
    checks: bool = True
    checks_encoder: str | None = None

    @property
    def defaults(self) -> GenerationSettings:
        """The decoding settings a request gets unless it overrides them (the evaluated ones); the
        MBR knobs only when the default decoding is MBR (else they wait for a request asking it)."""
        values = {f.name: getattr(self, f.name) for f in fields(GenerationSettings)}
        if values["decoding"] != "mbr":
            values.update(dict.fromkeys(MBR_FIELDS))
        return GenerationSettings(**values)

    def mbr_knobs(self) -> dict:
        """The MBR knobs set for this server (what a request asking for "decoding": "mbr" gets)."""
        return {name: getattr(self, name) for name in MBR_FIELDS if getattr(self, name) is not None}

    def mbr_allowed(self) -> bool:
        """Whether a request may ask for "decoding": "mbr" (MBR_REQUESTS, or MBR is the default)."""
        return bool(self.mbr_requests) or self.decoding == "mbr"

    def token(self) -> str | None:
        """The bearer token from the environment variable TOKEN_ENV (None: no authentication)."""
        value = os.environ.get(self.token_env, "").strip()
        return value or None

    def limits(self) -> dict:
        """What a client may send, as /info and the docs show it."""
        return {"max_body_bytes": self.max_body_bytes, "max_dialogues": self.max_dialogues,
                "max_chars": self.max_chars, "max_new_tokens_limit": self.max_new_tokens_limit,
                "max_beams": self.max_beams, "max_pending": self.max_pending,
                "request_token_budget": self.request_token_budget, "request_timeout_s": self.request_timeout_s,
                "client_pending_tokens": self.client_pending_tokens}
