"""Using a finished model from the command line (inference_bart_lora.py) and the server: load it
with the defaults it was evaluated with, read dialogues from text/.txt/.jsonl/.json/.csv/.parquet
or stdin, and write summaries. Nothing here imports the web stack (pydantic, FastAPI).

Every row of an input file is read (there is no split: like `--split=all` in the evaluation
stage); rows with an empty dialogue are skipped and counted, never silently dropped.

Precision: `load_for_inference(..., precision="auto"|"fp32"|"bf16")` (model/precision.py
precision_for). Sharded runs (`accelerate launch --num_processes N inference_bart_lora.py
--input_file=...`) go through engine/sharding.py `summarize_sharded`.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetuneflow.contract.data import DIALOGUE_CANDIDATES, ID_CANDIDATES, check_unicode, pick_column, read_csv_text
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.io import atomic_write_text
from finetuneflow.contract.paths import is_hub_id, resolve
from finetuneflow.contract.record import portable, read_record
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import is_adapter_dir, load_model
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION

INPUT_FORMATS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
OUTPUT_FORMATS = (".jsonl", ".csv")
INHERITED = ("INSTRUCTION", "MAX_INPUT_LENGTH", *GenerationSettings.names())


# --- loading with inherited defaults -------------------------------------------------------
def load_for_inference(model: str, base_model: str | None = None, device: str | None = None,
                       load_in_4bit: bool | None = None, precision="auto") -> LoadedModel:
    """A merged/clean folder, an adapter folder (base from its run record, or `base_model`), an
    exported model (CTranslate2 folder, .gguf) or a Hub id, in `precision` (auto | fp32 | bf16, or
    a resolved hf.Precision). A missing local folder names the stage that writes it."""
    path = resolve(model)
    if not path.exists() and not is_hub_id(model):
        raise UserError(f"model not found: {path} (the clean merged model is written by `python "
                        f"post_merge_cleanup.py`, an adapter by `python train_bart_lora.py`)")
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json", "model.bin")) \
            and not list(path.glob("*.gguf")):
        raise UserError(f"{path} is not a model folder (no config.json, adapter_config.json, CTranslate2 model.bin "
                        f"or .gguf)")
    load_in_4bit = loads_in_4bit(model, load_in_4bit)
    source = str(path) if path.exists() else model
    if isinstance(precision, str) or precision is None:
        from finetuneflow.model.precision import precision_for
        precision = precision_for(source, precision or "auto", device, bool(load_in_4bit))
    return load_model(source, device=device, load_in_4bit=bool(load_in_4bit), base_model=base_model or None,
                      dtype=precision.dtype)


def loads_in_4bit(model: str, load_in_4bit: bool | None) -> bool:
    """LOAD_IN_4BIT, or for an adapter folder left at None: as the adapter was trained."""
    path = resolve(model)
    if load_in_4bit is None and path.is_dir() and is_adapter_dir(path):
        record = read_record(path)
        return bool(record and record.load_in_4bit)
    return bool(load_in_4bit)


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
            "adapter": portable(loaded.adapter), "family": str(loaded.family), "backend": loaded.backend.name,
            "device": str(loaded.device), "dtype": loaded.dtype, "stage": record.stage if record else None,
            "merged_from": record.lineage.merged_from if record else None}


# --- reading dialogues ---------------------------------------------------------------------
@dataclass
class Inputs:
    ids: list[str]
    dialogues: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)   # ids of rows with an empty dialogue
    rows: int = 0                                       # rows read (skipped ones included)


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text (a BOM is allowed), or one clear error naming the first bad byte."""
    if not data.strip():
        raise UserError(f"{where} is empty: nothing to summarize")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"re-save it as UTF-8") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def _parquet_rows(path: Path) -> list:
    import pandas as pd
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:   # pyarrow raises many types for a damaged file
        raise UserError(f"{path}: cannot be read as parquet ({first_line(exc)}); check the file") from None
    rows = frame.to_dict("records")
    # missing values come back as NaN/None: an empty dialogue, counted as skipped
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]


def _records(path: Path, text: str) -> list:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv_text(text, str(path))
    if suffix == ".json":
        data = _json(text, str(path))
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of dialogues (strings or objects)")
        return data
    return [_json(line, f"{path} line {number}") for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _file_inputs(path: Path, text_column: str | None, id_column: str | None) -> Inputs:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _parquet_rows(path)
    else:
        content = decode_text(path.read_bytes(), str(path))
        if suffix == ".txt":
            return Inputs([path.stem], [content.strip()], str(path), rows=1)
        records = _records(path, content)
    if not records:
        raise UserError(f"{path} has no rows: nothing to summarize")
    if all(isinstance(r, str) for r in records):
        records = [{"dialogue": r} for r in records]
    if not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: every row must be a JSON object (or every row a string)")
    columns = list(dict.fromkeys(str(k) for r in records for k in r))
    dialogue_key = pick_column(columns, text_column, DIALOGUE_CANDIDATES, "dialogue", True, str(path))
    id_key = pick_column(columns, id_column, ID_CANDIDATES, "id", False, str(path))
    inputs = Inputs([], [], str(path), rows=len(records))
    for number, record in enumerate(records, 1):
        row_id = str(record.get(id_key)) if id_key and record.get(id_key) is not None else f"row-{number}"
        value = record.get(dialogue_key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path} row {number} (id {row_id!r}): {dialogue_key!r} is "
                            f"{type(value).__name__}, not text")
        if not (value or "").strip():
            inputs.skipped.append(row_id)
            continue
        inputs.ids.append(check_unicode(row_id, f"{path} row {number}: its id"))
        inputs.dialogues.append(check_unicode(value.strip(), f"{path} row {number} (id {row_id!r})"))
    if not inputs.dialogues:
        raise UserError(f"{path}: all {len(records)} rows have an empty {dialogue_key!r}: nothing to summarize")
    return inputs


def read_inputs(text: str = "", input_file: str = "", text_column: str | None = None,
                id_column: str | None = None, stdin=None) -> Inputs:
    """Dialogues from TEXT, else INPUT_FILE (.txt = one dialogue; .jsonl/.json/.csv/.parquet rows,
    every row), else stdin (read as bytes, so non-UTF-8 input is one clear error)."""
    if text:
        if not text.strip():
            raise UserError("--TEXT is empty (only spaces): nothing to summarize")
        text = check_unicode(text, "--TEXT")
        return Inputs(["text"], [text.replace("\\n", "\n") if "\n" not in text else text], "TEXT", rows=1)
    if input_file:
        path = resolve(input_file)
        if path.is_dir():
            raise UserError(f"INPUT_FILE={path} is a folder; give one file ({', '.join(INPUT_FORMATS)})")
        if not path.is_file():
            raise UserError(f"INPUT_FILE not found: {path}")
        if path.suffix.lower() not in INPUT_FORMATS:
            raise UserError(f"{path}: unsupported input format; use {', '.join(INPUT_FORMATS)}")
        return _file_inputs(path, text_column, id_column)
    if stdin is None or stdin.isatty():
        raise UserError("no input: give --TEXT='...', --INPUT_FILE=<.txt/.jsonl/.json/.csv/.parquet> or pipe a "
                        "dialogue on stdin")
    raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
    content = decode_text(raw, "stdin")
    return Inputs(["stdin"], [content.strip()], "stdin", rows=1)


def write_outputs(path: Path, rows: list[dict]) -> None:
    """Summaries as .jsonl (one object a line) or .csv (nested values as JSON text), atomically."""
    if path.suffix.lower() == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id", "summary"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
