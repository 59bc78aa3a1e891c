"""Output safety for the two plan stages. benchmark_models.py and recommend_finetune.py share one
folder (outputs/benchmarks by default: the ranking and the plan built from it), so each stage owns
the files it lists in its own run record there, not the folder. On top of
finetuneflow.contract.safety (never the project root, a folder above it, home, /, a repository, an
input, or a folder inside an input):

1. OUTPUT_DIR is not inside a `.git` folder, is a folder (or does not exist yet), and is writable.
2. It is new, empty, or holds the run record of a plan stage (`run_config.json` of
   benchmark_models, `recommend_finetune.run_config.json`); anything else there is the user's
   folder and is refused. (The atomic writers' hidden leftovers of a killed run, and the inputs
   the stage reads from that folder, such as the ranking, do not count.)
3. An existing file is replaced only when this stage's previous record lists it (a first-wave
   record without a list: the stage's fixed file names). Every other file is never touched.
4. Files of an earlier run that this run does not write again are removed only when the record
   lists them and they are unchanged since (same sha256); an edited one is kept and reported.

The record is written before the outputs (listing old and new files), so an interrupted run
leaves files its next run recognises as its own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, read_record, sha256_file, write_record
from finetuneflow.contract.safety import check_location, check_writable

BENCHMARK, RECOMMEND = "benchmark_models", "recommend_finetune"
RECORDS = {BENCHMARK: "run_config.json", RECOMMEND: "recommend_finetune.run_config.json"}
FIRST_WAVE_FILES = {   # what a record without a file list owns (glob patterns)
    BENCHMARK: ("final_ranking.csv", "final_ranking.json", "final_ranking.html", "rouge.png", "tradeoff.png",
                "predictions/*_predictions.csv"),
    RECOMMEND: ("recommendations.json", "finetune_plan.md", "train_*.sh")}
_LEFTOVER = re.compile(r"^\..+\.(tmp|old)")   # atomic_write_text / atomic_path / atomic_dir temp names


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _resolved_inputs(inputs: Iterable) -> list[Path]:
    found = []
    for item in inputs:
        if item is None or item == "":
            continue
        path = resolve(item)
        if path.exists():
            found.append(path.resolve())
    return found


def _stage_records(folder: Path) -> dict[str, RunRecord]:
    """The plan-stage records in `folder`, by stage (a record naming another stage does not count)."""
    found = {}
    for stage, name in RECORDS.items():
        record = read_record(folder, name) if (folder / name).is_file() else None
        if record is not None and record.stage == stage:
            found[stage] = record
    return found


def _check_place(out: Path, setting: str, inputs: list[Path], shared_inputs: list[Path]) -> None:
    """Rule 1 and contract.safety's rules; `shared_inputs` may lie inside the folder (the ranking
    recommend_finetune reads sits beside the plan it writes)."""
    if ".git" in out.parts:
        raise UserError(f"{setting}={out} is inside a .git folder (a repository's internals): a stage never writes "
                        f"there; choose a new folder such as outputs/benchmarks")
    check_location(out, setting, [p for p in inputs if not (p in shared_inputs and _inside(p, out))])
    if out.exists() and not out.is_dir():
        raise UserError(f"{setting}={out} is a file, not a folder; choose a folder name")
    check_writable(out, setting, folder=True)


@dataclass
class StageFolder:
    """A plan stage's view of its output folder: where it is, its previous record, what it owns."""
    path: Path
    stage: str
    setting: str
    previous: RunRecord | None = None
    owned: dict[str, str | None] = field(default_factory=dict)   # relative path -> sha256 when written
    inputs: list[Path] = field(default_factory=list)

    @property
    def record_name(self) -> str:
        return RECORDS[self.stage]

    def check_files(self, names: Iterable[str]) -> None:
        """Each file this run will write: not an input, not a folder, and not someone else's file."""
        for name in names:
            target = self.path / name
            if target.resolve() in self.inputs:
                raise UserError(f"{self.setting}={self.path}: {name} is an input of this run; choose another "
                                f"{self.setting}")
            if target.is_dir():
                raise UserError(f"{self.setting}={self.path}: {name} is a folder, not a file {self.stage} wrote; "
                                f"move it or choose another {self.setting}")
            if target.exists() and name not in self.owned:
                raise UserError(f"{self.setting}={self.path}: {name} exists and was not written by {self.stage}; "
                                f"move it or choose another {self.setting}")

    def check_folder(self, name: str) -> None:
        """A sub-folder this run replaces as a whole: every file in it must be this stage's."""
        folder = self.path / name
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{self.setting}={self.path}: {name} is a file, not the folder {self.stage} writes; move "
                            f"it or choose another {self.setting}")
        if folder.is_dir():
            foreign = sorted(str(p.relative_to(self.path)) for p in folder.rglob("*")
                             if not p.is_dir() and str(p.relative_to(self.path)) not in self.owned)
            if foreign:
                raise UserError(f"{self.setting}={self.path}: {name}/ holds files that {self.stage} did not write "
                                f"({', '.join(foreign[:3])}); move them or choose another {self.setting}")

    def claim(self, names: Iterable[str], record: RunRecord, cfg: dict, inputs: Iterable) -> None:
        """Write this stage's record before its outputs, listing the earlier files and these."""
        listed = {**self.owned, **{n: self.owned.get(n) for n in names}}
        record.extra.update(status="writing", files=listed)
        self.path.mkdir(parents=True, exist_ok=True)
        write_record(self.path, record, cfg, inputs, name=self.record_name)

    def finish(self, names: Iterable[str], record: RunRecord, cfg: dict, inputs: Iterable) -> tuple[list, list]:
        """The final record (the files written, with their sha256) and the stale-file cleanup
        (rule 4). Returns (removed, kept) names of earlier files."""
        written = {n: sha256_file(self.path / n) for n in names if (self.path / n).is_file()}
        removed, kept = [], []
        for name, digest in self.owned.items():
            target = self.path / name
            if name in written or not target.is_file():
                continue
            if digest is None or sha256_file(target) == digest:
                target.unlink()
                removed.append(name)
            else:
                kept.append(name)
        record.extra.update(status="finished", files={**written, **{n: self.owned[n] for n in kept}})
        write_record(self.path, record, cfg, inputs, name=self.record_name)
        return removed, kept


def _owned_files(folder: Path, stage: str, record: RunRecord | None) -> dict[str, str | None]:
    if record is None:
        return {}
    files = record.extra.get("files")
    if isinstance(files, dict):
        return {str(k): (v if isinstance(v, str) else None) for k, v in files.items()
                if isinstance(k, str) and ".." not in Path(k).parts and not Path(k).is_absolute()}
    owned = {}   # a first-wave record: the stage's fixed names, as they are now
    for pattern in FIRST_WAVE_FILES[stage]:
        for path in folder.glob(pattern):
            if path.is_file():
                owned[str(path.relative_to(folder))] = sha256_file(path)
    return owned


def open_stage_folder(path: str | os.PathLike, stage: str, *, setting: str = "OUTPUT_DIR", inputs: Iterable = (),
                      shared_inputs: Iterable = ()) -> StageFolder:
    """Check OUTPUT_DIR against the rules above (before any slow work) and read what this stage
    owns there. Creates nothing."""
    out = resolve(path).resolve()
    inputs, shared = _resolved_inputs(inputs), _resolved_inputs(shared_inputs)
    _check_place(out, setting, inputs, shared)
    records = _stage_records(out) if out.is_dir() else {}
    if out.is_dir() and not records:
        foreign = sorted(p.name for p in out.iterdir() if not _LEFTOVER.match(p.name) and p.resolve() not in shared)
        if foreign:
            raise UserError(f"{setting}={out} already holds files that {stage} did not write "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or empty "
                            f"folder")
    previous = records.get(stage)
    return StageFolder(out, stage, setting, previous, _owned_files(out, stage, previous), inputs)
