"""Where things live: the project root, the fixed artifact folders, and stage-aware lookups.

The root is `$FTF_ROOT` when set, else the folder holding the stage scripts; never the
current working directory. Relative paths given by the user are resolved against the root.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from finetuneflow.contract.errors import UserError

CODE_ROOT = Path(__file__).resolve().parents[2]          # the folder holding the stage scripts
BUNDLED_SAMPLES = CODE_ROOT / "data" / "samples" / "dialogues.jsonl"
ROOT = Path(os.environ.get("FTF_ROOT") or CODE_ROOT).resolve()
FT_OUTPUTS = "ft_outputs"
METRICS = "metrics"
OUTPUTS = "outputs"


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: `~` expanded, relative paths taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def project_relative(path: str | os.PathLike) -> str:
    """How a report (summary_metrics, report.html) names a local file: relative to the project root,
    `../shared/data/x.csv` for one beside it, so a committed report names no machine's folders.
    Run records use `record.portable` instead (absolute outside the root: a later stage resolves it)."""
    return os.path.relpath(resolve(path), ROOT)


def output_dir(path: str | os.PathLike) -> Path:
    """Resolve an output folder and create it."""
    p = resolve(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def require(path: str | os.PathLike, produced_by: str, what: str = "input") -> Path:
    """Resolve `path` and fail with the stage that produces it when it is missing."""
    p = resolve(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p} (it is written by `python {produced_by}`; run that "
                        f"stage first or pass the right path)")
    return p


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether `name` is shaped like a Hub id ("gpt2", "org/model") rather than a local path."""
    first = name.split("/", 1)[0]
    return bool(_HUB_ID.match(name)) and not name.endswith((".gguf", ".jsonl", ".json", ".csv", ".parquet", ".txt")) \
        and first not in (FT_OUTPUTS, METRICS, OUTPUTS, "models", "data") and ".." not in name
