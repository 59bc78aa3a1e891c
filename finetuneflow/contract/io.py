"""Atomic writes: outputs appear complete or not at all."""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# Every CSV the project writes with text in it quotes every field: a "\r" or "\n" inside a summary or a
# dialogue then stays inside its field and reads back exactly (pandas, the csv module, spreadsheets). Unquoted,
# a bare "\r" ends the row for most readers: a predictions file read back would have split rows.
CSV_QUOTING = csv.QUOTE_ALL


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask mode."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        public_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | os.PathLike, fix: str) -> dict:
    """A JSON object from `path`; an unreadable or non-object file is one UserError ending in `fix`."""
    from finetuneflow.contract.errors import UserError
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({type(exc).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; {fix}")
    return data


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temp file path beside `path`; rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        public_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; it replaces `path` only when the block succeeds: the old
    folder is moved aside, the new one renamed into place, and only then is the old one deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    public_mode(tmp, is_dir=True)
    try:
        yield tmp
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old"))
            os.replace(path, aside / path.name)
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
