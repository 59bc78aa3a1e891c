"""Setting specs: what values a setting takes, and turning a raw value into one of them.

A spec is the bracketed start of a setting's comment (contract/settings.py reads the block):
`[int >= 1 | None]`, `[0 <= float < 1]`, `[truncate | chunk | error]`, `[list[f32 | f16 | q8_0]]`.
Alternatives are separated by `|`: `None`, a type (`int`, `float`, `bool`, `str`, `dict`, `list`,
`list[...]` of any spec), a type with bounds, or a choice (a word, or a quoted string; matched
case-insensitively, stored as declared). `parse_spec` reads one, `spec_from_default` infers one
from a default, and `coerce` turns a command-line string (or a value from a file or the script)
into a value of the spec, or raises a UserError that names the setting and what it accepts.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from finetuneflow.contract.errors import UserError

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
