"""Prediction CSVs: writing this project's format and reading it back, or the seed's.

This project's format (written by eval_bart_lora.py) has exactly the columns in `COLUMNS`.
The seed project's CSVs use `human_summary` / `model_summary` and an id column such as
`sample_id`; any extra columns (its own ROUGE numbers) are ignored and recomputed. Every read
gives a `Predictions` with the standard columns id, dialogue, reference, prediction (strings;
dialogue may be absent), in file order; with several references (REFERENCE_COLUMNS, or the columns
eval_bart_lora.py's record names) `references` holds each row's references, the first in `reference`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import sha256_file
from finetuneflow.contract.io import CSV_QUOTING, atomic_write_text

BASE_COLUMNS = ("id", "dialogue", "reference", "prediction", "rouge1", "rouge2", "rougeL", "rougeLsum",
                "pred_words", "ref_words")
# The truncation ledger: the dialogue's input tokens with the model's prompt, the tokens cut from it,
# and the windows it was summarized in (1 = whole). Files of the first wave lack these columns.
LEDGER_COLUMNS = ("input_tokens", "cut_tokens", "windows")
COLUMNS = BASE_COLUMNS + LEDGER_COLUMNS
REFERENCE_COLUMNS = ("reference", "human_summary", "summary", "target", "highlights", "gold")
PREDICTION_COLUMNS = ("prediction", "model_summary", "generated_summary", "generated", "output", "hypothesis")
ID_COLUMNS = ("id", "sample_id", "fname", "idx", "guid", "example_id")
DIALOGUE_COLUMNS = ("dialogue", "dialog", "conversation", "text", "source", "document", "input")
PRODUCER = "eval_bart_lora.py"


@dataclass
class Predictions:
    name: str
    path: Path
    frame: pd.DataFrame                  # id, dialogue (may be None), reference, prediction
    format: str                          # "finetuneflow" or "seed"
    columns: dict[str, str | None]       # role -> column in the file
    notes: list[str] = field(default_factory=list)
    eval_record: dict | None = None      # <tag>_eval.json written next to it by eval_bart_lora.py
    extras: pd.DataFrame | None = None   # every other column of the file (strings), for --buckets
    references: list[list[str]] | None = None   # several references per row (the first is `reference`)
    reference_columns: list[str] = field(default_factory=list)   # where they came from (several only)

    @property
    def ids(self) -> list[str]:
        return self.frame["id"].tolist()

    @property
    def has_dialogue(self) -> bool:
        return self.columns.get("dialogue") is not None


def write_predictions(path: Path, rows: list[dict]) -> Path:
    """Write rows (dicts with every name in COLUMNS, and the same optional columns each: more
    references, ROUGE means over them, mbr_choice) as this project's predictions CSV. Every field is
    quoted (contract/io.py CSV_QUOTING), so a summary holding "\r" or "\n" reads back exactly."""
    buffer = io.StringIO()
    extra = [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], extrasaction="raise", lineterminator="\n",
                            quoting=CSV_QUOTING)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def default_name(path: Path) -> str:
    """`metrics/lora_predictions.csv` -> `lora`; `validation_predictions.csv` -> `validation`."""
    stem = path.stem
    for suffix in ("_predictions", "-predictions", ".predictions"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _pick(columns: list[str], candidates: tuple) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def eval_record_for(path: Path) -> dict | None:
    """The `<name>_eval.json` eval_bart_lora.py wrote beside `<name>_predictions.csv`, if any and
    if it belongs to this file (an interrupted run can leave an older record beside newer
    predictions: the record's predictions_sha256 must match)."""
    sidecar = path.with_name(f"{default_name(path)}_eval.json")
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    expected = record.get("predictions_sha256") if isinstance(record, dict) else None
    if expected and expected != sha256_file(path):
        return None
    return record


def several_references(path: Path, frame: pd.DataFrame, wanted: list[str] | None, record: dict | None) -> list[str]:
    """The columns holding several references: `wanted` (REFERENCE_COLUMNS), else those the eval
    record names (eval_bart_lora.py --reference_columns); [] for one reference."""
    columns = list(frame.columns)
    wanted = [c.strip() for c in (wanted or []) if c.strip()]
    if not wanted:
        named = ((record or {}).get("references") or {}).get("csv_columns") or []
        return named if len(named) > 1 and all(c in columns for c in named) else []
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UserError(f"{path}: no reference column {missing[0]!r} (REFERENCE_COLUMNS); columns found: "
                        f"{', '.join(columns)}")
    if len(wanted) == 1:
        raise UserError(f"REFERENCE_COLUMNS={wanted[0]} names one column; name every reference column, or leave it "
                        f"empty for the file's own reference")
    return wanted


def read_predictions(path: str | Path, name: str | None = None, reference_columns: list[str] | None = None
                     ) -> Predictions:
    """Read one predictions CSV (this project's format or the seed's), with one-line errors;
    `reference_columns`: several references (see several_references)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file not found: {path} (it is written by `python {PRODUCER} "
                        f"--tag=<name>`; run that first or pass the right path)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (no header, no rows); re-create it with `python {PRODUCER}`") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 CSV") from None
    except pd.errors.ParserError as exc:
        raise UserError(f"{path} is not a readable CSV ({str(exc).strip().splitlines()[0][:160]})") from None
    columns = list(frame.columns)
    record = eval_record_for(path)
    several = several_references(path, frame, reference_columns, record)
    found = {"reference": several[0] if several else _pick(columns, REFERENCE_COLUMNS),
             "prediction": _pick(columns, PREDICTION_COLUMNS), "id": _pick(columns, ID_COLUMNS),
             "dialogue": _pick(columns, DIALOGUE_COLUMNS)}
    for role, candidates in (("reference", REFERENCE_COLUMNS), ("prediction", PREDICTION_COLUMNS)):
        if found[role] is None:
            raise UserError(f"{path} has no {role} column (expected one of {', '.join(candidates)}); "
                            f"columns found: {', '.join(columns) or 'none'}")
    if frame.empty:
        raise UserError(f"{path} is empty (a header but no rows); re-create it with `python {PRODUCER}`")
    notes = []
    if found["id"] is None:
        ids = [str(i) for i in range(len(frame))]
        notes.append("no id column: rows are identified by their position")
    else:
        ids = [v.strip() for v in frame[found["id"]]]
        duplicated = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()
        if duplicated:
            raise UserError(f"{path}: {len(duplicated)} duplicate ids in column {found['id']!r} "
                            f"(first: {duplicated[0]!r}); each row needs its own id")
    references = frame[found["reference"]].tolist()
    for column in several or [found["reference"]]:
        blank = [i for i, r in zip(ids, frame[column]) if not r.strip()]
        if blank:
            raise UserError(f"{path}: {len(blank)} rows have an empty reference in {column!r} (first id "
                            f"{blank[0]!r}); they cannot be scored: fix or remove them")
    predictions = frame[found["prediction"]].tolist()
    empty_predictions = sum(not p.strip() for p in predictions)
    if empty_predictions:
        notes.append(f"{empty_predictions} empty predictions (scored 0, bucket 'empty')")
    standard = pd.DataFrame({
        "id": ids,
        "dialogue": frame[found["dialogue"]].tolist() if found["dialogue"] else [None] * len(frame),
        "reference": references, "prediction": predictions})
    if found["dialogue"] is None:
        notes.append("no dialogue column: compression and the copied/names/truncation buckets are skipped")
    fmt = "finetuneflow" if set(BASE_COLUMNS) <= set(columns) else "seed"
    used = {c for c in found.values() if c} | set(several)
    extras = frame[[c for c in columns if c not in used]].copy()
    extras.insert(0, "id", ids)
    refs = [list(row) for row in zip(*(frame[c].tolist() for c in several))] if several else None
    return Predictions(name or default_name(path), path, standard, fmt, found, notes, record, extras, refs, several)


def check_same_samples(versions: list[Predictions], allow_different: bool = False) -> list[str]:
    """The ids shared by every version (in the first version's order).

    Different id sets are an error unless `allow_different`; the same id with a different
    reference always is (the versions were evaluated on different data)."""
    first = versions[0]
    first_ids = set(first.ids)
    shared = set(first_ids)
    for other in versions[1:]:
        shared &= set(other.ids)
    for other in versions[1:]:
        other_ids = set(other.ids)
        only_first = [i for i in first.ids if i not in other_ids]
        only_other = [i for i in other.ids if i not in first_ids]
        if (only_first or only_other) and not allow_different:
            example = (only_first or only_other)[0]
            raise UserError(
                f"row ids differ between {first.name} ({first.path.name}, {len(first.ids)} rows) and {other.name} "
                f"({other.path.name}, {len(other.ids)} rows): {len(only_first)} ids only in {first.name}, "
                f"{len(only_other)} only in {other.name} (e.g. {example!r}); evaluate every version on the same "
                f"DATASET/SPLIT/N_SAMPLES/SEED, or pass --allow_different_samples=true to compare shared rows only")
        ref_a = dict(zip(first.frame["id"], first.frame["reference"]))
        ref_b = dict(zip(other.frame["id"], other.frame["reference"]))
        differing = [i for i in shared if ref_a[i].strip() != ref_b[i].strip()]
        if differing:
            raise UserError(f"{len(differing)} rows have the same id but a different reference in {first.name} and "
                            f"{other.name} (e.g. id {sorted(differing)[0]!r}): they were evaluated on different data")
    return [i for i in first.ids if i in shared]
