"""The settings contract shared by every stage script.

A stage script declares its settings as UPPER_CASE constants at the top of the file (the block
above its first import), each with a trailing comment. The comment may start with a *spec* in
square brackets that says what values the setting takes:

    NUM_BEAMS = None              # [int >= 1 | None] beams; None: inherit
    LONG_INPUT = "truncate"       # [truncate | chunk | error] what to do with long dialogues
    LORA_DROPOUT = 0.05           # [0 <= float < 1] dropout on the LoRA path
    OUTTYPE = ["q8_0"]            # [list[f32 | f16 | q8_0]] GGUF weight types

Alternatives are separated by `|`: `None`, a type (`int`, `float`, `bool`, `str`, `dict`, `list`,
`list[...]` of any spec), a type with bounds (`int >= 1`, `0 < float <= 1`), or a choice (a word,
or a quoted string; matched case-insensitively, stored as declared). Without a spec the setting
takes the type of its default; a `None` default must declare one.

The specs themselves (reading one, checking a value against it) live in contract/specs.py.

`configure(globals(), argv)` turns the block into a `Config`:

* defaults from the constants (checked against their specs), then `--config=recipe.yaml` (a file
  of NAME: value overrides), then `--NAME=value` / `--NAME value` flags (case-insensitive,
  `-` == `_`); the command line wins;
* booleans parse as true/false/1/0/yes/no/on/off, numbers must be finite and in range, lists take
  `a,b,c` or `["a","b"]`;
* an unknown flag is an error that suggests the closest name; an old name listed in `renamed`
  still works with a one-line note; `--help` prints the docstring and every setting with its
  spec, default and comment.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.specs import Alternative, Spec, SpecError, coerce, parse_spec, spec_from_default

CONFIG_FLAG = "config"


# ----------------------------------------------------------------------------- the settings block

@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    spec: Spec
    comment: str = ""


def split_comment(comment: str) -> tuple[str | None, str]:
    """`[spec] description` -> (spec, description); (None, comment) without a spec."""
    if not comment.startswith("["):
        return None, comment
    depth = 0
    for i, ch in enumerate(comment):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth == 0:
            return comment[1:i].strip(), comment[i + 1:].strip()
    raise SpecError(f"unclosed [spec] in comment {comment!r}")


def declared_settings(script_globals: dict) -> list[Setting]:
    """Each UPPER_CASE assignment in the block at the top of the script (before its first import),
    with its spec and the rest of its trailing comment, in source order."""
    source_file = script_globals.get("__file__")
    if not source_file:
        return [Setting(k, v, spec_from_default(v)) for k, v in script_globals.items()
                if k.isupper() and not k.startswith("_")]
    source = Path(source_file).read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            break  # the settings block ends where the code begins; later constants are internal
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            if not (isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_")):
                continue
            name = target.id
            default = script_globals[name] if name in script_globals else ast.literal_eval(node.value)
            end_line = lines[node.end_lineno - 1]
            comment = end_line.split("#", 1)[1].strip() if "#" in end_line else ""
            spec_text, comment = split_comment(comment)
            if spec_text is not None:
                spec = parse_spec(spec_text)
            elif default is None:
                raise SpecError(f"{source_file}: {name} = None needs a spec, e.g. `{name} = None  # [int | None] ...`")
            else:
                spec = spec_from_default(default)
            found.append(Setting(name, default, spec, comment))
    return found


class Config(dict):
    """Resolved settings: `cfg.MAX_STEPS` and `cfg["MAX_STEPS"]` both work. `cfg.meta` records
    where they came from (the --config file and its sha256, old names used)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "meta", {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def help_text(script_globals: dict, renamed: dict | None = None) -> str:
    doc = (script_globals.get("__doc__") or "").strip()
    rows = []
    for s in declared_settings(script_globals):
        row = f"  --{s.name}={s.default!r}"
        inferred = spec_from_default(s.default) if s.default is not None else None
        if inferred is None or s.spec != inferred:
            row += f"  [{s.spec.describe()}]"
        rows.append(row + (f"    # {s.comment}" if s.comment else ""))
    text = (doc + "\n\nSettings (override with --NAME=value; names are case-insensitive; "
            f"--{CONFIG_FLAG}=FILE.yaml loads NAME: value overrides, the command line wins):\n" + "\n".join(rows))
    if renamed:
        text += "\n\nOld names still accepted: " + ", ".join(f"--{old} (now --{new})" for old, new in renamed.items())
    return text + "\n"


def _read_config_file(raw_path: str) -> tuple[Path, dict]:
    import yaml   # PyYAML: a dependency of transformers and huggingface_hub
    from finetuneflow.contract.paths import resolve
    path = resolve(raw_path)
    if not path.is_file():
        raise UserError(f"--{CONFIG_FLAG}={raw_path}: no such file ({path})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--{CONFIG_FLAG}={raw_path}: not valid YAML ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--{CONFIG_FLAG}={raw_path}: expected NAME: value lines, found a {type(data).__name__}")
    return path, data


def _split_argv(argv: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: settings are given as --NAME=value (see --help)")
        key, has_value, raw = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"--{key} needs a value: write --{key}=VALUE")
            raw, i = argv[i + 1], i + 1
        pairs.append((key, raw))
        i += 1
    return pairs


def configure(script_globals: dict, argv: Iterable[str] | None = None,
              renamed: dict[str, str] | None = None) -> Config:
    """Defaults from the script's constants, then a --config file, then `argv` (default sys.argv[1:]).
    `renamed` maps old setting names to current ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(script_globals, renamed))
        raise SystemExit(0)
    settings = {s.name: s for s in declared_settings(script_globals)}
    by_key = {n.lower(): n for n in settings}
    old_names = {old.lower(): new for old, new in (renamed or {}).items()}
    script = Path(script_globals.get("__file__") or "the script").name
    cfg = Config()
    for s in settings.values():
        try:
            cfg[s.name] = coerce(s.name, s.default, s.spec)
        except UserError as exc:
            raise UserError(f"{s.name} = {s.default!r} at the top of {script}: "
                            f"{str(exc).split(': ', 1)[1]}") from None

    def assign(key: str, raw: Any, where: str) -> None:
        lookup = key.replace("-", "_").lower()
        if lookup in old_names:
            new = old_names[lookup]
            print(f"note: --{key.upper()} is now --{new} (the old name still works)", file=sys.stderr)
            cfg.meta.setdefault("renamed", []).append(key.upper())
            lookup = new.lower()
        if lookup not in by_key:
            close = difflib.get_close_matches(lookup, list(by_key), n=1, cutoff=0.5)
            hint = f"; did you mean --{by_key[close[0]]}?" if close else "; see --help for the list"
            raise UserError(f"unknown setting {where}{key}{hint}")
        name = by_key[lookup]
        cfg[name] = coerce(name, raw, settings[name].spec)

    pairs = _split_argv(argv)
    files = [raw for key, raw in pairs if key.replace("-", "_").lower() == CONFIG_FLAG]
    if len(files) > 1:
        raise UserError(f"--{CONFIG_FLAG} given {len(files)} times; merge the files or pass one")
    if files:
        path, data = _read_config_file(files[0])
        for key, value in data.items():
            assign(str(key), value, f"{path.name}: ")
        cfg.meta["config_file"] = {"path": files[0], "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for key, raw in pairs:
        if key.replace("-", "_").lower() != CONFIG_FLAG:
            assign(key, raw, "--")
    return cfg


# ----------------------------------------------------------------------------- typed views

class FromConfig:
    """Mixin for the typed settings a library function takes: each dataclass field is the
    lower-case name of a stage setting. `from_config(cfg)` fails loudly when a required field has
    no setting, so renaming a constant in a script cannot silently change what the library gets."""

    @classmethod
    def from_config(cls, cfg: dict, **overrides):
        values = {}
        for f in fields(cls):   # type: ignore[arg-type]
            name = f.name.upper()
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif name in cfg:
                values[f.name] = cfg[name]
            elif f.default is MISSING and f.default_factory is MISSING:
                raise TypeError(f"{cls.__name__}.{f.name} has no setting {name} in this stage")
        return cls(**values)


__all__ = ["Alternative", "Config", "FromConfig", "Setting", "Spec", "SpecError", "coerce", "configure",
           "declared_settings", "help_text", "parse_spec", "spec_from_default"]
