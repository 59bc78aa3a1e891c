"""The project's `.env` files, read with python-dotenv once, when the library is first imported:
before anything reads the environment (FTF_ROOT decides the project root), so every stage and the
server see them. Two places, the first one wins: `$FTF_ROOT/.env` (when FTF_ROOT is set in the
environment) and `.env` beside the stage scripts (a copy of `.env_example.txt`).

A variable already set in the environment wins over the files; an empty value sets nothing. A
file with a line python-dotenv cannot parse sets nothing at all (no half-applied file): the
problem is kept, and `run_cli` prints it as one `error:` line naming the line before the stage
starts (an import never fails).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

DOTENV = Path(__file__).resolve().parents[2] / ".env"
problem: str | None = None      # why a .env file was not applied (run_cli reports it)


def load_dotenv_files() -> dict[str, str]:
    """$FTF_ROOT/.env, then the code folder's .env; returns what they set."""
    places = [Path(os.environ["FTF_ROOT"]).expanduser() / ".env"] if os.environ.get("FTF_ROOT") else []
    applied: dict[str, str] = {}
    for path in dict.fromkeys(p.resolve() for p in (*places, DOTENV)):
        applied.update(load_dotenv_file(path))
        if problem:
            break
    return applied


def load_dotenv_file(path: Path = DOTENV) -> dict[str, str]:
    """Apply `path` to os.environ (variables not already set); returns what it set."""
    global problem
    if not path.is_file():
        return {}
    try:
        from dotenv import dotenv_values
        from dotenv.parser import parse_stream
    except ImportError:
        problem = f"{path} exists but python-dotenv is not installed; pip install python-dotenv (or remove the file)"
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot read {path} ({exc}); re-save it as UTF-8 text or remove it"
        return {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            string = binding.original.string   # python-dotenv counts from the blank lines before it
            line = binding.original.line + string[:len(string) - len(string.lstrip())].count("\n")
            problem = (f"{path} line {line}: cannot parse {string.strip()[:60]!r}; write NAME=value (quote a value "
                       f"holding spaces or #), or remove the line")
            return {}
    applied = {}
    for name, value in dotenv_values(stream=io.StringIO(text), interpolate=True).items():
        if value and name not in os.environ:
            os.environ[name] = applied[name] = value
    return applied
