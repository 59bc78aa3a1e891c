"""The run folder (OUTPUT_DIR): what a run finds there, and what it may change (no torch import:
the stage decides, and refuses, before loading the heavy libraries).

* `checkpoints/run_config.json` records the settings of an unfinished run. A checkpoint counts
  only once `ftf_complete.json` lists every file in it with its size (written by
  trainer.CheckpointCallback after every process has saved its part), so a SIGKILL at any moment
  leaves the newest complete checkpoint usable.
* RESUME=auto continues from it when the settings match (settings added since a run was recorded
  are not part of its identity; NUM_BEAMS=4 / MAX_NEW_TOKENS=192 recorded by runs made before
  they became None = "family default" match None). Other settings are an error unless
  OVERWRITE, except when the unfinished run is not worth protecting: it has no complete
  checkpoint (a start that failed after its checks) or it stopped on a non-finite loss. Such a
  run is replaced, and the stage says so in one line.
* The finished folder holds exactly the files named in its run_config.json "files" list.
  OVERWRITE (or replacing) removes only those files, the record and the stage's own checkpoint
  folders, never anything else the user keeps there.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.contract.record import RECORD_FILE, RunRecord, describe_inputs, read_record, write_record
from finetuneflow.train.settings import (ADDED_LATER, ADDED_WITH_DEFAULT, CHECKPOINT_NAME, FORMER_DEFAULTS,
                                         IDENTITY_IGNORED, RENAMED, STAGE)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "ftf_complete.json"
STAGING_PREFIX = ".final-"
FAILED = "failed"


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else -1


def mark_complete(checkpoint: Path) -> None:
    """Record every file of a saved checkpoint with its size; only then does it count."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER and not p.name.endswith(".tmp")}
    atomic_write_json(checkpoint / COMPLETE_MARKER, {"files": files})


def is_complete(checkpoint: Path) -> bool:
    try:
        files = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(files) and all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size
                               for name, size in files.items())


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) >= 0 and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def drop_checkpoint(checkpoint: Path) -> None:
    """Unmark first, so a kill halfway through the deletion leaves an ignored, not a broken, checkpoint."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def remove_checkpoints(folder: Path) -> None:
    """Remove the stage's own entries of a checkpoints folder: the checkpoint-N folders first, the
    unfinished run's record last (a kill in between leaves a record, never unowned checkpoints);
    the folder itself only when nothing else is left in it."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and checkpoint_step(path) >= 0:
            drop_checkpoint(path)
    for path in folder.iterdir():
        if path.is_file() and (path.name == RECORD_FILE or path.name.startswith(f".{RECORD_FILE}.")):
            path.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


# ----------------------------------------------------------------------------- run identity

def run_identity(config: Mapping, inputs: dict) -> dict:
    """The settings and input contents that define a run (input paths may be recorded absolute
    or relative to the project root, so only the file contents count)."""
    kept = {RENAMED.get(k, k): v for k, v in config.items() if RENAMED.get(k, k) not in IDENTITY_IGNORED}
    contents = sorted(json.dumps(v, sort_keys=True) for v in inputs.values())
    return json.loads(json.dumps({"config": kept, "inputs": contents}, default=str, sort_keys=True))


def _same_setting(name: str, old: dict, new: dict) -> bool:
    """Equal values; or a setting the saved run predates (one that changes what is trained only
    when the new value is its default); or an old default that is now None (the family default
    that replaced it)."""
    if name in ADDED_LATER and name not in old:
        return True
    if name in ADDED_WITH_DEFAULT and name not in old:
        return new.get(name) == ADDED_WITH_DEFAULT[name]
    before, now = old.get(name), new.get(name)
    return before == now or (now is None and name in FORMER_DEFAULTS and before == FORMER_DEFAULTS[name])


def identity_differences(saved: dict, current: dict) -> list[str]:
    old, new = saved["config"], current["config"]
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if not _same_setting(k, old, new)]
    if saved["inputs"] != current["inputs"]:
        diffs.append("the input data changed")
    return diffs


def _shown(diffs: list[str]) -> str:
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


# ----------------------------------------------------------------------------- the plan

@dataclass
class RunPlan:
    out: Path
    finished: bool = False            # OUTPUT_DIR already holds a finished run with these settings
    wipe: bool = False                # remove the earlier run first (OVERWRITE, or a run not worth keeping)
    resume_from: Path | None = None   # the checkpoint to continue from
    note: str | None = None           # why an earlier run is replaced (printed once)

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS


def _own_record(folder: Path) -> RunRecord | None:
    record = read_record(folder)
    return record if record and record.stage == STAGE else None


def _replaceable(unfinished: RunRecord, available: list[Path], diffs: list[str]) -> str | None:
    """Why an unfinished run may be replaced without OVERWRITE (None: it is worth protecting)."""
    if unfinished.extra.get("status") == FAILED:
        return f"it stopped: {unfinished.extra.get('failure') or 'failed'}"
    if diffs and not available:
        return f"it has no complete checkpoint; settings changed: {_shown(diffs)}"
    return None


def plan_run(out: Path, config: Mapping, input_files: Iterable, resume: str, overwrite: bool) -> RunPlan:
    """Decide, without touching anything, whether to start, resume, skip, replace or refuse.
    `config` is the run's resolved settings as its record stores them."""
    plan = RunPlan(out)
    finished, unfinished = _own_record(out), _own_record(out / CHECKPOINTS)
    named = resume not in ("auto", "never")
    if finished is None and unfinished is None:
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"OUTPUT_DIR {out} already holds files that are not from train_bart_lora.py; "
                            f"choose an empty or new --OUTPUT_DIR")
        if named:
            raise UserError(f"RESUME={resume}: {out} holds no unfinished run to resume; use --RESUME=auto to start")
        return plan
    if overwrite:
        plan.wipe = True
        return plan
    saved = finished or unfinished
    diffs = identity_differences(run_identity(saved.config, saved.inputs),
                                 run_identity(config, describe_inputs(input_files)))
    available = complete_checkpoints(out / CHECKPOINTS)
    if finished is None and (why := _replaceable(unfinished, available, diffs)):
        if named:
            raise UserError(f"RESUME={resume}: the unfinished run in {out} cannot be resumed ({why}); use "
                            f"--RESUME=auto to replace it")
        plan.wipe, plan.note = True, f"replacing the unfinished run in {out} ({why})"
        return plan
    if diffs:
        state = "a finished" if finished else "an unfinished"
        raise UserError(f"OUTPUT_DIR {out} holds {state} run with other settings ({_shown(diffs)}); pass "
                        f"--OVERWRITE=True to replace it, or choose another --OUTPUT_DIR")
    if finished:
        plan.finished = True
        return plan
    plan.resume_from = _resume_point(out, available, resume)
    return plan


def _resume_point(out: Path, available: list[Path], resume: str) -> Path | None:
    if resume == "auto":
        return available[-1] if available else None
    if resume == "never":
        return None
    wanted = Path(resume).name
    match = [c for c in available if c.name == wanted]
    if not match:
        raise UserError(f"RESUME={resume!r}: no complete checkpoint of that name in {out / CHECKPOINTS} "
                        f"(complete: {', '.join(c.name for c in available) or 'none'}); use auto or never")
    return match[0]


# ----------------------------------------------------------------------------- carrying it out

def own_files(out: Path) -> list[Path]:
    """The finished run's files, as its record lists them (plain names inside `out` only)."""
    record = _own_record(out)
    names = [str(name) for name in (record.extra.get("files", []) if record else [])]
    return [out / name for name in names if "/" not in name and "\\" not in name and name not in ("", ".", "..")
            and (out / name).is_file() and not (out / name).is_symlink()]


def _dropped_on_start(path: Path, resume_from: Path | None) -> bool:
    """Every checkpoint for a fresh start; when resuming, the half-written ones and any newer."""
    if not path.is_dir() or checkpoint_step(path) < 0:
        return False
    return resume_from is None or not is_complete(path) or checkpoint_step(path) > checkpoint_step(resume_from)


def prepare_run_dir(plan: RunPlan, config: Mapping, input_files: Iterable, keep_checkpoints: bool) -> None:
    """Carry out the plan on disk (main process only). Replacing an earlier run goes in an order
    that keeps this stage's record in the folder at every moment (a kill never leaves files the
    next run would take for the user's): its checkpoints go first, then the new run's record is
    written, then the old finished record, then the files it listed. Nothing else is removed."""
    out = plan.out
    if plan.note:
        print(plan.note)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if plan.finished:
        if not keep_checkpoints:
            remove_checkpoints(plan.checkpoints)
        return
    replaced = own_files(out) if plan.wipe else []
    if plan.checkpoints.is_dir():
        for path in plan.checkpoints.iterdir():
            if _dropped_on_start(path, plan.resume_from):
                drop_checkpoint(path)
    plan.checkpoints.mkdir(parents=True, exist_ok=True)
    write_record(plan.checkpoints, RunRecord(STAGE, extra={"status": "unfinished"}), config, input_files)
    if plan.wipe:
        (out / RECORD_FILE).unlink(missing_ok=True)
        for path in replaced:
            if path.name != RECORD_FILE:
                path.unlink(missing_ok=True)


def mark_failed(plan: RunPlan, reason: str) -> None:
    """Record in the unfinished run's record that it stopped (so the corrected command replaces it)."""
    record = read_record(plan.checkpoints)
    if record is None:
        return
    data = record.to_dict()
    data.update(status=FAILED, failure=reason)
    atomic_write_json(plan.checkpoints / RECORD_FILE, data)
