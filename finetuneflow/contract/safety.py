"""The one output-safety rule. Every stage checks every file or folder it is about to write with
`check_output_dir` / `check_output_file` before any slow work, and replaces folders only through
`replace_dir`:

1. An output is never the project root, the folder holding the stage scripts, the home folder,
   the filesystem root, any folder that holds a `.git`, nor an ancestor of any of these.
2. An output never is, contains, or sits inside an input of the same run (the model, the
   adapter, its base, the dataset, the .gguf being imported, ...).
3. An existing non-empty output is replaced only when it carries this stage's own marker (the run
   record a previous run of the same stage wrote there) and, for folders, only with the stage's
   overwrite flag. Anything else there is the user's and is never touched.
4. Replacement is atomic: the new output is written beside the old one, swapped in by rename,
   and only then is the old one deleted; an interrupted run leaves the old output intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_dir
from finetuneflow.contract.paths import CODE_ROOT, ROOT, resolve

RECORD_FILE = "run_config.json"


def _protected() -> list[Path]:
    return [p.resolve() for p in (ROOT, CODE_ROOT, Path.home(), Path(Path.cwd().anchor))]


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _stage_of(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def check_location(out: Path, setting: str, inputs: Iterable = ()) -> None:
    """Rules 1 and 2 for an output path (absolute): not a protected place, not an input."""
    for protected in _protected():
        if _within(protected, out):
            what = "the project root" if protected in (ROOT, CODE_ROOT) else str(protected)
            raise UserError(f"{setting}={out} is {what} or a folder above it: a stage never writes there; choose a "
                            f"new folder such as ft_outputs/<name>")
    if ".git" in out.parts:
        raise UserError(f"{setting}={out} is inside a .git folder: a stage never writes there; choose another place")
    if (out / ".git").exists():
        raise UserError(f"{setting}={out} holds a .git folder (a repository): a stage never writes there; choose "
                        f"a new folder")
    for item in inputs:
        if item is None:
            continue
        source = resolve(item)
        if not source.exists():
            continue
        source = source.resolve()
        if source == out:
            raise UserError(f"{setting}={out} is an input of this run; choose another {setting}")
        if _within(source, out):
            raise UserError(f"{setting}={out} contains an input of this run ({source}); choose another {setting}")
        if source.is_dir() and _within(out, source):
            raise UserError(f"{setting}={out} is inside an input of this run ({source}); choose a folder outside it")


def check_writable(out: Path, setting: str, folder: bool = False) -> None:
    """The output can be created: it (a folder output) or its nearest existing ancestor is a
    writable folder (nothing is created yet, so a run that fails later leaves no empty folders)."""
    existing = out if folder else out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting}={out}: {existing} is a file, not a folder; choose another location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{setting}={out}: {existing} is not writable; choose a writable location")


def check_output_dir(path: str | os.PathLike, *, stage: str, setting: str = "OUTPUT_DIR", inputs: Iterable = (),
                     overwrite: bool = False, markers: Iterable[str] = (RECORD_FILE,)) -> Path:
    """Resolve an output folder and check it against the rule; returns the absolute path. An
    existing folder counts as this stage's when one of `markers` (relative paths of run records)
    names `stage`."""
    out = resolve(path).resolve()
    check_location(out, setting, inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"{setting}={out} is a file, not a folder; choose a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not any(_stage_of(out / m) == stage for m in markers):
            sample = ", ".join(sorted(p.name for p in out.iterdir())[:3])
            raise UserError(f"{setting}={out} already holds files that {stage} did not write ({sample}, ...); "
                            f"choose a new or empty folder")
        if not overwrite:
            raise UserError(f"{setting}={out} holds an earlier {stage} output; pass --OVERWRITE=True to replace it, "
                            f"or choose another {setting}")
    check_writable(out, setting, folder=True)
    return out


def check_output_file(path: str | os.PathLike, *, stage: str, setting: str, inputs: Iterable = (),
                      marker: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Resolve an output file and check it against the rule; returns the absolute path. An
    existing file is replaced when `marker` (its run record) names `stage`, or with `overwrite`."""
    out = resolve(path).resolve()
    check_location(out, setting, inputs)
    if out.is_dir():
        raise UserError(f"{setting}={out} is a folder; give a file name")
    if out.exists() and not overwrite and not (marker is not None and _stage_of(Path(marker)) == stage):
        raise UserError(f"{setting}={out} exists and was not written by {stage}; choose another name, or delete it "
                        f"first")
    check_writable(out, setting)
    return out


def replace_dir(path: str | os.PathLike):
    """A temporary folder beside `path` (checked with check_output_dir first) that replaces `path`
    atomically when the block succeeds; otherwise it is removed and `path` is untouched."""
    return atomic_dir(path)
