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
import math
import operator
import re
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from finetuneflow.contract.errors import UserError

CONFIG_FLAG = "config"
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}
_NONE = {"none", "null"}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list}
_OPS = {ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Lt: "<"}
_WORD = re.compile(r"[A-Za-z0-9_.\-/]+")


class SpecError(ValueError):
    """A malformed spec in a script: a developer's mistake, not a user's."""


# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class Alternative:
    kind: str                                  # "none", "choice", or a key of _TYPES
    choice: str | None = None
    bounds: tuple[tuple[str, float], ...] = ()  # (op, number): value op number
    item: "Spec | None" = None                 # for list[...]

    def describe(self) -> str:
        if self.kind == "none":
            return "None"
        if self.kind == "choice":
            return self.choice if _WORD.fullmatch(self.choice or "-") else repr(self.choice)
        if self.kind == "list" and self.item is not None:
            return f"list[{self.item.describe()}]"
        lower = [(op, n) for op, n in self.bounds if op.startswith(">")]
        upper = [(op, n) for op, n in self.bounds if op.startswith("<")]
        if len(lower) == 1 and len(upper) == 1:   # "0 <= float < 1"
            (lo_op, lo), (hi_op, hi) = lower[0], upper[0]
            return f"{_number(lo)} {lo_op.replace('>', '<')} {self.kind} {hi_op} {_number(hi)}"
        return " ".join([self.kind, *(f"{op} {_number(n)}" for op, n in self.bounds)])


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class Spec:
    alternatives: tuple[Alternative, ...]

    def describe(self) -> str:
        return " | ".join(a.describe() for a in self.alternatives)

    @property
    def choices(self) -> list[str]:
        return [a.choice for a in self.alternatives if a.kind == "choice"]

    def allows(self, kind: str) -> bool:
        return any(a.kind == kind for a in self.alternatives)

    def of(self, kind: str) -> Alternative | None:
        return next((a for a in self.alternatives if a.kind == kind), None)


def _split_top(text: str, sep: str = "|") -> list[str]:
    """Split on `sep` outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _bounds(text: str) -> Alternative | None:
    """`int >= 1`, `0 <= float < 1`: a comparison chain around one type name."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Compare):
        return None
    operands = [node.left, *node.comparators]
    names = [i for i, o in enumerate(operands) if isinstance(o, ast.Name)]
    if len(names) != 1 or operands[names[0]].id not in ("int", "float"):
        return None
    where, kind, bounds = names[0], operands[names[0]].id, []
    for i, op in enumerate(node.ops):
        left, right = operands[i], operands[i + 1]
        symbol = _OPS.get(type(op))
        other = right if i == where else left
        if symbol is None or not isinstance(other, ast.Constant) or not isinstance(other.value, (int, float)):
            raise SpecError(f"bad bound in spec {text!r}")
        if i != where:   # "0 <= float": flip to "float >= 0"
            symbol = {">=": "<=", ">": "<", "<=": ">=", "<": ">"}[symbol]
        bounds.append((symbol, float(other.value)))
    return Alternative(kind, bounds=tuple(bounds))


def parse_spec(text: str) -> Spec:
    alternatives = []
    for part in _split_top(text):
        if not part:
            raise SpecError(f"empty alternative in spec {text!r}")
        if part == "None":
            alternatives.append(Alternative("none"))
        elif part in _TYPES:
            alternatives.append(Alternative(part))
        elif part.startswith("list[") and part.endswith("]"):
            alternatives.append(Alternative("list", item=parse_spec(part[5:-1])))
        elif part[0] in "'\"":
            alternatives.append(Alternative("choice", choice=ast.literal_eval(part)))
        elif (bounded := _bounds(part)) is not None:
            alternatives.append(bounded)
        elif _WORD.fullmatch(part):
            alternatives.append(Alternative("choice", choice=part))
        else:
            raise SpecError(f"cannot read spec {text!r} (at {part!r})")
    return Spec(tuple(alternatives))


def spec_from_default(default: Any) -> Spec:
    if isinstance(default, bool):
        return parse_spec("bool")
    if isinstance(default, (list, tuple)):
        kinds = {type(v) for v in default}
        item = "int" if kinds == {int} else "float" if kinds and kinds <= {int, float} else "str"
        return parse_spec(f"list[{item}]")
    for name in ("int", "float", "str", "dict"):
        if isinstance(default, _TYPES[name]):
            return parse_spec(name)
    raise SpecError(f"cannot infer a spec from default {default!r}; annotate the setting")


# ----------------------------------------------------------------------------- values

def _bad(name: str, raw: Any, spec: Spec, why: str = "") -> UserError:
    shown = raw if isinstance(raw, str) else repr(raw)
    return UserError(f"--{name}={shown}: {why or 'must be ' + spec.describe()} (see --help)")


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _in_bounds(value: float, bounds) -> bool:
    return all(_COMPARE[op](value, limit) for op, limit in bounds)


def _number_from(raw: Any, kind: str) -> int | float | None:
    """An int/float from a string or a number; None when it is not one."""
    value = raw
    if isinstance(raw, str):
        try:
            value = ast.literal_eval(raw.strip().replace("_", ""))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = float(raw.strip())   # "inf", "nan", "1e999"
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    return float(value)


def _list_items(raw: Any) -> list:
    if isinstance(raw, (list, tuple)):
        return list(raw)
    text = str(raw).strip()
    if text.startswith(("[", "(")):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError from None
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for part in text.split(",") if part.strip()]


def coerce(name: str, raw: Any, spec: Spec) -> Any:
    """`raw` (a command-line string, or a value from a file or the script) as a value of `spec`.
    Raises a UserError that names the setting and what it accepts."""
    text = raw.strip() if isinstance(raw, str) else None
    if raw is None or (text is not None and text.lower() in _NONE and spec.allows("none")):
        if spec.allows("none"):
            return None
        raise _bad(name, raw, spec, f"must not be None; must be {spec.describe()}")
    out_of_range = None
    for alt in spec.alternatives:
        if alt.kind == "choice":
            if text is not None and alt.choice is not None and text.lower() == alt.choice.lower():
                return alt.choice
        elif alt.kind == "bool":
            if isinstance(raw, bool):
                return raw
            if text is not None and text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
        elif alt.kind in ("int", "float"):
            value = _number_from(raw, alt.kind)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise _bad(name, raw, spec, "is not a finite number")
            if not _in_bounds(value, alt.bounds):
                out_of_range = alt
                continue
            return value
        elif alt.kind == "list":
            try:
                items = _list_items(raw)
            except ValueError:
                continue
            if alt.item is None:
                return items
            return [coerce(name, item, alt.item) for item in items]
        elif alt.kind == "dict":
            value = raw
            if text is not None:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    continue
            if isinstance(value, dict):
                return value
        elif alt.kind == "str":
            if isinstance(raw, str):
                if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                    return text[1:-1]
                return raw
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return str(raw)
    if out_of_range is not None:
        raise _bad(name, raw, spec, f"out of range: must be {spec.describe()}")
    if spec.choices and not any(a.kind not in ("choice", "none") for a in spec.alternatives):
        raise _bad(name, raw, spec, f"must be one of {', '.join(spec.choices)}"
                   + (" or None" if spec.allows("none") else ""))
    raise _bad(name, raw, spec, f"is not a valid {spec.describe()}")


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
