"""The launch scripts recommend_finetune.py writes: `train_<model>.sh`, which runs the trainer under
`accelerate launch` with the plan's settings as `--NAME=value` arguments. The launcher is the
interpreter that wrote the script (`<sys.executable> -m accelerate.commands.launch`), never an
`accelerate` found on PATH: a virtual environment that is not activated still trains.

Everything in a script that came from outside (model names and sources from the ranking CSV, the
dataset, GPU_NAME, TRAINER) is inert text:
* every value is one `--NAME=value` word quoted with shlex.quote (a value can never become a
  second argument, a command, or an expansion: `$(...)`, backticks, `;`, quotes, newlines stay
  literal and reach the trainer exactly);
* comments are single lines: newlines, carriage returns and other control characters in names
  are neutralised before they are written after a `#`;
* the file name is `train_<slug>.sh` with an ASCII slug of the model name (no path separator,
  no `..`, no leading dash), unique within one plan;
* every value is checked against the trainer's own settings contract first (its `[spec]`s), so a
  script never passes a value the trainer would refuse, and a setting the trainer does not have
  is dropped and reported.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import CODE_ROOT
from finetuneflow.contract.settings import Setting, SpecError, coerce, declared_settings
from finetuneflow.plan.hardware import one_line

LAUNCH_FLAGS = "--num_processes=1 --num_machines=1 --mixed_precision=no --dynamo_backend=no"


def launcher(python: str | None = None) -> str:
    """`<python> -m accelerate.commands.launch <flags>`, the interpreter shell-quoted (this process's
    by default: the one whose environment has accelerate and the library installed)."""
    return f"{shlex.quote(python or sys.executable or 'python3')} -m accelerate.commands.launch {LAUNCH_FLAGS}"


@dataclass(frozen=True)
class Trainer:
    """The training stage the scripts run, and the settings it declares."""
    path: Path
    settings: dict[str, Setting]


def read_trainer(name: str) -> Trainer:
    """TRAINER (a path relative to the stage scripts, or absolute) and its settings block."""
    path = Path(name).expanduser()
    path = (path if path.is_absolute() else CODE_ROOT / path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"TRAINER={name}: {path} is not a Python stage script; pass the trainer, e.g. "
                        f"--TRAINER=train_bart_lora.py")
    try:
        settings = declared_settings({"__file__": str(path)})
    except (SyntaxError, ValueError, SpecError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"TRAINER={name}: cannot read its settings block ({first_line(exc)}); pass a stage script "
                        f"such as train_bart_lora.py") from None
    if not settings:
        raise UserError(f"TRAINER={name}: {path} declares no settings (UPPER_CASE constants above its imports); pass "
                        f"a stage script such as train_bart_lora.py")
    return Trainer(path, {s.name: s for s in settings})


def slug(name: str) -> str:
    """A file-name-safe ASCII slug: letters, digits, `.`, `_`, `-`, never starting with `.` or `-`."""
    text = re.sub(r"[^a-z0-9._-]+", "_", str(name).lower())
    text = re.sub(r"\.{2,}", "_", text).strip("._-")[:80]
    return text or "model"


def script_name(model: str, taken: set) -> str:
    """`train_<slug>.sh`, unique within `taken` (which it extends)."""
    base, i = slug(model), 2
    name = base
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return f"train_{name}.sh"


def check_flags(flags: dict, trainer: Trainer) -> tuple[dict, list[str]]:
    """(the flags the trainer declares, as it will parse them; the names it does not have). A value
    its spec refuses, or one no command line can carry (a NUL byte), is an error."""
    kept, dropped = {}, []
    for name, value in flags.items():
        setting = trainer.settings.get(name)
        if setting is None:
            dropped.append(name)
            continue
        text = value if isinstance(value, str) else ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if "\x00" in text:
            raise UserError(f"{name} for the trainer contains a NUL character, which no command line can carry; fix "
                            f"the ranking's model name or source")
        try:
            coerce(name, text, setting.spec)
        except UserError as exc:
            raise UserError(f"the plan's {name}={one_line(text)[:80]} would be refused by {trainer.path.name} "
                            f"({first_line(exc)})") from None
        kept[name] = text
    return kept, sorted(dropped)


def comment(text: str) -> str:
    """A bash comment line (text made single-line first)."""
    return "# " + one_line(text)


def launch_script(flags: dict[str, str], header: list[str], script: Path, trainer: Path) -> str:
    """A bash script that runs `trainer` under `accelerate launch` with `--NAME=value` for each flag,
    from the trainer's folder (a path relative to the script, so the folder can move); extra
    arguments of the script pass through. `header` lines become comments."""
    folder = os.path.relpath(trainer.parent, script.parent)
    lines = ["#!/usr/bin/env bash", *(comment(line) for line in header),
             comment("Extra --NAME=value arguments go to the trainer (e.g. --MAX_STEPS=20 for a smoke test)."),
             "set -euo pipefail",
             f'cd "$(dirname "$0")"/{shlex.quote(folder)}',
             f"exec {launcher()} \\",
             f"  {shlex.quote(trainer.name)} \\",
             *(f"  {shlex.quote(f'--{name}={value}')} \\" for name, value in flags.items()),
             '  "$@"', ""]
    return "\n".join(lines)
