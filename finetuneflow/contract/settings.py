"""The configuration contract shared by every stage script.

A stage script declares its settings as UPPER_CASE constants at the top of the file, each
with a trailing comment. `configure(globals(), argv)` turns them into a `Config`:

* `--NAME=value` or `--NAME value` overrides a constant (case-insensitive, `-` == `_`);
* a value is parsed with the constant's type: Python literals, an int is accepted for a float,
  booleans as true/false/1/0/yes/no, lists as `a,b,c` or `["a","b"]`; a `None` default accepts
  any literal (or the raw string);
* an unknown flag is an error that suggests the closest name; `--help` prints the script's
  docstring and every constant with its default and comment.

`write_run_config` saves the resolved config with library versions, the git commit and a
sha256 of every input file; `inherit` fills constants left at `None` from an upstream stage's
`run_config.json`.
"""
from __future__ import annotations

import ast
import datetime as _dt
import difflib
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.contract.paths import ROOT

RUN_CONFIG = "run_config.json"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes",
                     "rouge-score", "bert-score", "sacrebleu", "gguf", "ctranslate2")
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


class Config(dict):
    """Resolved settings: `cfg.MAX_STEPS` and `cfg["MAX_STEPS"]` both work."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def declared_settings(script_globals: dict) -> list[tuple[str, str]]:
    """(name, trailing comment) of each UPPER_CASE assignment in the block at the top of the
    script (before its first import), in source order."""
    source_file = script_globals.get("__file__")
    if not source_file:
        return [(k, "") for k in script_globals if k.isupper() and not k.startswith("_")]
    source = Path(source_file).read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            break  # the settings block ends where the code begins; later constants are internal
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_"):
                end_line = lines[node.end_lineno - 1]
                comment = end_line.split("#", 1)[1].strip() if "#" in end_line else ""
                found.append((target.id, comment))
    return found


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") or text.startswith("("):
        value = ast.literal_eval(text)
        return [str(v) if not isinstance(v, (int, float, bool)) else v for v in value]
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_value(name: str, raw: str, default: Any) -> Any:
    """Parse a command-line string into the type of the constant's default."""
    try:
        if default is None:
            if raw.strip() == "None":
                return None
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        if isinstance(default, bool):
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if isinstance(default, int):
            value = ast.literal_eval(raw.strip())
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError
            return value
        if isinstance(default, float):
            value = ast.literal_eval(raw.strip())
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            return float(value)
        if isinstance(default, (list, tuple)):
            items = _split_list(raw)
            kinds = {type(v) for v in default}
            if len(kinds) == 1 and kinds <= {int, float}:
                items = [parse_value(name, str(v), next(iter(default))) for v in items]
            return type(default)(items)
        if isinstance(default, dict):
            value = ast.literal_eval(raw)
            if not isinstance(value, dict):
                raise ValueError
            return value
        if isinstance(default, str):
            stripped = raw.strip()
            if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
                return stripped[1:-1]
            return raw
    except (ValueError, SyntaxError):
        pass
    raise UserError(f"--{name}={raw!r} is not a valid {type(default).__name__} "
                    f"(default {default!r}); fix the value or see --help")


def help_text(script_globals: dict) -> str:
    doc = (script_globals.get("__doc__") or "").strip()
    rows = []
    for name, comment in declared_settings(script_globals):
        rows.append(f"  --{name}={script_globals[name]!r}" + (f"    # {comment}" if comment else ""))
    return (doc + "\n\nSettings (override with --NAME=value; names are case-insensitive):\n"
            + "\n".join(rows) + "\n")


def configure(script_globals: dict, argv: Iterable[str] | None = None) -> Config:
    """Defaults from the script's constants, overridden by `argv` (default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [name for name, _ in declared_settings(script_globals)]
    by_key = {n.lower(): n for n in names}
    cfg = Config({n: script_globals[n] for n in names})
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text(script_globals))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: settings are given as --NAME=value (see --help)")
        key, has_value, raw = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"--{key} needs a value: write --{key}=VALUE")
            raw, i = argv[i + 1], i + 1
        lookup = key.replace("-", "_").lower()
        if lookup not in by_key:
            close = difflib.get_close_matches(lookup, list(by_key), n=1, cutoff=0.5)
            hint = f"; did you mean --{by_key[close[0]]}?" if close else "; see --help for the list"
            raise UserError(f"unknown setting --{key}{hint}")
        name = by_key[lookup]
        cfg[name] = parse_value(name, raw, script_globals[name])
        i += 1
    return cfg


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_inputs(paths: Iterable[str | Path | None]) -> dict:
    """{path: sha256} for local files, {folder: {file: sha256}} for folders; Hub ids as-is."""
    described: dict[str, Any] = {}
    for item in paths:
        if item is None:
            continue
        path = Path(item)
        if path.is_file():
            described[str(path)] = sha256_file(path)
        elif path.is_dir():
            described[str(path)] = {str(p.relative_to(path)): sha256_file(p)
                                    for p in sorted(path.rglob("*")) if p.is_file()
                                    and not any(part.startswith("checkpoint-") for part in p.parts)}
        else:
            described[str(item)] = "hub-or-remote"
    return described


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for lib in TRACKED_LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_config(out_dir: Path, stage: str, cfg: dict, inputs: Iterable = (),
                     extra: dict | None = None, name: str = RUN_CONFIG) -> Path:
    """Save the resolved config beside a stage's outputs (atomically). Stages that share a
    folder (metrics/) pass their own `name`, e.g. `lora_run_config.json`."""
    record = {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in cfg.items()},
        "inputs": describe_inputs(inputs),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    record.update(extra or {})
    path = Path(out_dir) / name
    atomic_write_json(path, record)
    return path


def read_run_config(folder: Path, name: str = RUN_CONFIG) -> dict | None:
    path = Path(folder) / name
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def inherit(cfg: Config, upstream: dict | None, names: Iterable[str]) -> list[str]:
    """Fill each of `names` still `None` from an upstream run config; returns what was filled.

    The upstream value is looked up in its `config` block, then in its top-level keys (where
    stages record derived facts such as `family` or `base_model`)."""
    filled = []
    if not upstream:
        return filled
    for name in names:
        if cfg.get(name) is not None:
            continue
        for source in (upstream.get("config", {}), upstream):
            if source.get(name) is not None:
                cfg[name] = source[name]
                filled.append(name)
                break
    return filled
