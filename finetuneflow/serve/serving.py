"""Using a finished model: load it with the defaults it was evaluated with, read dialogues from
text/.txt/.jsonl/.json/.csv, write summaries, and micro-batch concurrent requests for the HTTP
service. inference_bart_lora.py and serve_api.py share all of it.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetuneflow.contract.data import DIALOGUE_CANDIDATES, ID_CANDIDATES
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_write_text
from finetuneflow.contract.paths import is_hub_id, resolve
from finetuneflow.contract.record import portable, read_record
from finetuneflow.model.loading import LoadedModel, is_adapter_dir, load_model
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION

GENERATION_NAMES = GenerationSettings.names()
INPUT_FORMATS = (".txt", ".jsonl", ".json", ".csv")
OUTPUT_FORMATS = (".jsonl", ".csv")


# --- loading with inherited defaults -------------------------------------------------------
INHERITED = ("INSTRUCTION", "MAX_INPUT_LENGTH", *GenerationSettings.names())


def load_for_inference(model: str, base_model: str | None = None, device: str | None = None,
                       load_in_4bit: bool | None = None) -> LoadedModel:
    """A merged/clean folder, an adapter folder (base from its run record, or `base_model`), an
    exported model (CTranslate2 folder, .gguf) or a Hub id. A missing local folder names the
    stage that writes it."""
    path = resolve(model)
    if not path.exists() and not is_hub_id(model):
        raise UserError(f"model not found: {path} (the clean merged model is written by `python "
                        f"post_merge_cleanup.py`, an adapter by `python train_bart_lora.py`)")
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json", "model.bin")) \
            and not list(path.glob("*.gguf")):
        raise UserError(f"{path} is not a model folder (no config.json, adapter_config.json, CTranslate2 model.bin "
                        f"or .gguf)")
    if load_in_4bit is None and is_adapter_dir(path):
        record = read_record(path)
        load_in_4bit = bool(record and record.load_in_4bit)
    return load_model(str(path) if path.exists() else model, device=device, load_in_4bit=bool(load_in_4bit),
                      base_model=base_model or None)


def inherit_defaults(cfg: dict, loaded: LoadedModel) -> list[str]:
    """Fill INSTRUCTION, MAX_INPUT_LENGTH and the generation settings left at None from the
    model's run record (what the model was trained/evaluated with). MAX_INPUT_LENGTH may stay
    None: the engine then uses the model's limit (less the new tokens, for causal models)."""
    filled = loaded.record.inherit_into(cfg, [n for n in INHERITED if n in cfg]) if loaded.record else []
    if cfg.get("INSTRUCTION") is None:
        cfg["INSTRUCTION"] = DEFAULT_INSTRUCTION
    return filled


def model_info(loaded: LoadedModel) -> dict:
    record = loaded.record
    return {"model": portable(loaded.adapter or loaded.name), "base": portable(loaded.base),
            "adapter": portable(loaded.adapter), "family": loaded.family, "backend": loaded.backend.name,
            "device": str(loaded.device), "dtype": loaded.dtype, "stage": record.stage if record else None,
            "merged_from": record.lineage.merged_from if record else None}


# --- reading dialogues ---------------------------------------------------------------------
@dataclass
class Inputs:
    ids: list[str]
    dialogues: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)   # ids of empty rows


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path} is empty: nothing to summarize")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"re-save it as UTF-8") from None


def _column(columns: list[str], wanted: str | None, candidates: tuple, role: str, path: Path) -> str | None:
    if wanted:
        if wanted not in columns:
            raise UserError(f"{path}: no column {wanted!r} ({role}); columns found: {', '.join(columns)}")
        return wanted
    lowered = {c.lower(): c for c in columns}
    found = next((lowered[c] for c in candidates if c in lowered), None)
    if found is None and role == "dialogue":
        raise UserError(f"{path}: no dialogue column (tried {', '.join(candidates)}); columns found: "
                        f"{', '.join(columns)}; set --TEXT_COLUMN=<name>")
    return found


def _records(path: Path, text: str) -> list:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of dialogues (strings or objects)")
        return data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    return records


def read_inputs(text: str = "", input_file: str = "", text_column: str | None = None,
                id_column: str | None = None, stdin=None) -> Inputs:
    """Dialogues from TEXT, else INPUT_FILE (.txt = one dialogue; .jsonl/.json/.csv rows), else stdin."""
    if text:
        return Inputs(["text"], [text.replace("\\n", "\n") if "\n" not in text else text], "TEXT")
    if input_file:
        path = resolve(input_file)
        if not path.is_file():
            raise UserError(f"INPUT_FILE not found: {path}")
        if path.suffix.lower() not in INPUT_FORMATS:
            raise UserError(f"{path}: unsupported input format; use {', '.join(INPUT_FORMATS)}")
        content = _decode(path)
        if path.suffix.lower() == ".txt":
            return Inputs([path.stem], [content.strip()], str(path))
        records = _records(path, content)
        if not records:
            raise UserError(f"{path} has no rows: nothing to summarize")
        if all(isinstance(r, str) for r in records):
            records = [{"dialogue": r} for r in records]
        if not all(isinstance(r, dict) for r in records):
            raise UserError(f"{path}: every row must be a JSON object (or every row a string)")
        columns = list(dict.fromkeys(k for r in records for k in r))
        dialogue_key = _column(columns, text_column, DIALOGUE_CANDIDATES, "dialogue", path)
        id_key = _column(columns, id_column, ID_CANDIDATES, "id", path)
        inputs = Inputs([], [], str(path))
        for number, record in enumerate(records, 1):
            row_id = str(record.get(id_key)) if id_key and record.get(id_key) is not None else f"row-{number}"
            value = record.get(dialogue_key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{path} row {number} (id {row_id!r}): {dialogue_key!r} is "
                                f"{type(value).__name__}, not text")
            if not (value or "").strip():
                inputs.skipped.append(row_id)
                continue
            inputs.ids.append(row_id)
            inputs.dialogues.append(value.strip())
        if not inputs.dialogues:
            raise UserError(f"{path}: all {len(records)} rows have an empty {dialogue_key!r}: nothing to summarize")
        return inputs
    if stdin is None or stdin.isatty():
        raise UserError("no input: give --TEXT='...', --INPUT_FILE=<.txt/.jsonl/.json/.csv> or pipe a dialogue "
                        "on stdin")
    content = stdin.read()
    if not content.strip():
        raise UserError("stdin is empty: nothing to summarize")
    return Inputs(["stdin"], [content.strip()], "stdin")


def write_outputs(path: Path, rows: list[dict]) -> None:
    """Summaries as .jsonl (one object a line) or .csv (nested values as JSON text)."""
    if path.suffix.lower() == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id", "summary"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


# --- HTTP requests (serve_api.py) ---------------------------------------------------------
class Generation(BaseModel):
    """Decoding overrides for one request (unset = the service's defaults)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    num_beams: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    length_penalty: float | None = Field(None, ge=-10, le=10)


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


def error_response(status: int, code: str, message: str, **extra):
    """The one error shape of the service: {"error": {"code", "message"}}."""
    from fastapi.responses import JSONResponse
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else ({"Retry-After": "1"} if status == 503 else None)
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with nested models written out (the body is parsed by hand, so
    FastAPI does not register them under components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def expand(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return expand(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: expand(v) for k, v in node.items()}
        return [expand(v) for v in node] if isinstance(node, list) else node
    return expand(schema)


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable code, and a one-line message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def parse_request(body: bytes, limits: dict) -> tuple[SummarizeRequest, dict]:
    """The validated request (with `.dialogues` filled in) and its generation overrides; an
    ApiError (4xx) for malformed JSON, a wrong shape or any limit in `limits`."""
    most_dialogues, most_chars = limits["max_dialogues"], limits["max_chars"]
    most_tokens, most_beams = limits["max_new_tokens_limit"], limits["max_beams"]
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    try:
        request = SummarizeRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}") from None
    dialogues = request.dialogues if request.dialogues is not None else [request.dialogue]
    if not dialogues or len(dialogues) > most_dialogues:
        raise ApiError(422, "too_many_dialogues" if dialogues else "no_dialogues",
                       f"{len(dialogues)} dialogues; send 1 to {most_dialogues} per request")
    for i, dialogue in enumerate(dialogues):
        if not dialogue.strip():
            raise ApiError(422, "empty_dialogue", f"dialogue {i} is empty")
        if len(dialogue) > most_chars:
            raise ApiError(422, "dialogue_too_long", f"dialogue {i} has {len(dialogue)} characters; the limit "
                                                     f"is {most_chars}")
    overrides = request.generation.model_dump(exclude_none=True) if request.generation else {}
    if overrides.get("max_new_tokens", 0) > most_tokens:
        raise ApiError(422, "max_new_tokens_too_large",
                       f"max_new_tokens {overrides['max_new_tokens']} is over the limit {most_tokens}")
    if overrides.get("num_beams", 1) > most_beams:
        raise ApiError(422, "num_beams_too_large", f"num_beams {overrides['num_beams']} is over {most_beams}")
    if overrides.get("min_new_tokens", 0) > overrides.get("max_new_tokens", most_tokens):
        raise ApiError(422, "min_over_max", "min_new_tokens is larger than max_new_tokens")
    request.dialogues = dialogues
    return request, overrides


# --- micro-batching ------------------------------------------------------------------------
class Overloaded(Exception):
    """More dialogues are waiting than the service accepts."""


@dataclass
class _Item:
    dialogue: str
    settings: GenerationSettings
    key: tuple
    request: int
    future: asyncio.Future


class MicroBatcher:
    """Collects dialogues from concurrent requests for up to `wait_ms` (or until `batch_size`
    are waiting) and runs them as one engine call in a single worker thread, so the event loop
    stays free and the model is only ever used by one thread. Only dialogues with the same
    generation settings share a batch. With `enabled=False` each request runs alone (for
    comparison). When a batch fails, each of its requests is retried alone, so one bad input
    fails only its own request."""

    def __init__(self, run: Callable, batch_size: int = 8, wait_ms: float = 5.0, enabled: bool = True,
                 max_pending: int = 1024):
        self.run, self.batch_size, self.wait_ms = run, batch_size, wait_ms
        self.enabled, self.max_pending = enabled, max_pending
        self.pending: deque[_Item] = deque()
        self.stats = {"batches": 0, "dialogues": 0, "largest_batch": 0}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._requests = 0

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, dialogues: list[str], settings: GenerationSettings) -> list[tuple]:
        """(summary, truncated, windows, effective settings) per dialogue, in order."""
        if len(self.pending) + len(dialogues) > self.max_pending:
            raise Overloaded(f"{len(self.pending)} dialogues are waiting (limit {self.max_pending})")
        loop = asyncio.get_running_loop()
        self._requests += 1
        key = tuple(asdict(settings).values())
        items = [_Item(d, settings, key, self._requests, loop.create_future()) for d in dialogues]
        self.pending.extend(items)
        self._wakeup.set()
        return list(await asyncio.gather(*(i.future for i in items)))

    def _take(self) -> list[_Item]:
        first = self.pending[0]
        if not self.enabled:
            batch = [i for i in self.pending if i.request == first.request]
        else:
            batch = [i for i in self.pending if i.key == first.key][:self.batch_size]
        chosen = {id(i) for i in batch}
        self.pending = deque(i for i in self.pending if id(i) not in chosen)
        return batch

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.enabled and self.wait_ms > 0 and len(self.pending) < self.batch_size:
                await asyncio.sleep(self.wait_ms / 1000)
            batch = [i for i in self._take() if not i.future.done()]   # skip requests whose client left
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self.run, [i.dialogue for i in batch],
                                                batch[0].settings)
        except Exception as exc:  # noqa: BLE001  (handed to the waiting requests)
            requests = list(dict.fromkeys(i.request for i in batch))
            if len(requests) > 1:
                for request in requests:
                    await self._run([i for i in batch if i.request == request])
                return
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["dialogues"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        windows = getattr(result, "windows", None) or [1] * len(batch)
        for item, summary, truncated, count in zip(batch, result.summaries, result.truncated, windows):
            if not item.future.done():
                item.future.set_result((summary, truncated, count, result.settings))


def bearer_token(env_var: str) -> str | None:
    token = os.environ.get(env_var, "").strip()
    return token or None
