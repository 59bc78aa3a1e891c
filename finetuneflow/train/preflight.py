"""Everything a training run decides before it loads a heavy library (no torch, transformers or
peft import here, so a refused command fails in seconds): the settings' own checks, the adapter a
dpo/orpo run continues (train/start_adapter.py) and what it inherits from it, OUTPUT_DIR and
CACHE_DIR against the output-safety rule (contract/safety.py), the data and its splits (seeded by
SPLIT_SEED, else SEED), and the plan for the run folder (start, resume, skip, replace or refuse).
Nothing is written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from finetuneflow.contract.data import LoadedData, load_data, training_splits
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RECORD_FILE
from finetuneflow.contract.safety import check_location, check_output_dir
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.train import trackers
from finetuneflow.train.run_dir import CHECKPOINTS, RunPlan, plan_run, prepare_run_dir
from finetuneflow.train.settings import STAGE, TrainSettings
from finetuneflow.train.start_adapter import StartAdapter, check_start_adapter, with_inherited


@dataclass
class TrainJob:
    settings: TrainSettings
    data: LoadedData
    train_rows: datasets.Dataset
    val_rows: datasets.Dataset
    out: Path
    cache: Path | None
    plan: RunPlan
    note: str | None = None        # how the validation rows were found
    trackers: list = field(default_factory=list)   # REPORT_TO resolved: wandb / tensorboard / mlflow
    tracking_dir: Path | None = None
    state: object = None           # accelerate's PartialState, once the heavy part starts
    precision: object = None       # model.precision.TrainingPrecision, once the base is loaded
    generation: object = None      # the resolved GenerationSettings (family defaults filled in)
    generation_sources: dict = field(default_factory=dict)   # where each resolved decoding value came from
    eval_spec: object = None       # evaluation.GenerationEval
    select_on: str = "rougeL"      # the selection rule in force (rougeL when the faithfulness check cannot apply)
    select_note: str = ""
    start: StartAdapter | None = None   # the adapter a dpo/orpo run continues
    inherited: list = field(default_factory=list)   # settings taken from its record
    pairs: dict = field(default_factory=dict)       # dpo/orpo: the pairs of each corruption kind (train/pairs.py)

    @property
    def input_files(self) -> list:
        """What the run reads and its identity covers: the data files, and the start adapter's weights."""
        return [*self.data.local_files, *([self.start.weights] if self.start else [])]

    @property
    def is_main_process(self) -> bool:
        """The process that writes and prints (rank 0 under `accelerate launch`)."""
        if self.state is not None:
            return bool(self.state.is_main_process)
        return os.environ.get("RANK", "0") == "0"

    def say(self, *args) -> None:
        if self.is_main_process:
            print(*args)

    @property
    def instruction(self) -> str:
        return self.settings.instruction or DEFAULT_INSTRUCTION


def check_outputs(settings: TrainSettings) -> tuple[Path, Path | None]:
    """OUTPUT_DIR and CACHE_DIR against the output-safety rule, before any slow work. OUTPUT_DIR may
    hold this stage's run (finished, or unfinished under checkpoints/); what happens to it is the
    plan's decision."""
    inputs = [settings.dataset, settings.model, *([settings.start_adapter] if settings.start_adapter else [])]
    out = check_output_dir(settings.output_dir, stage=STAGE, inputs=inputs, overwrite=True,
                           markers=(RECORD_FILE, f"{CHECKPOINTS}/{RECORD_FILE}"))
    if not settings.cache_dir:
        return out, None
    cache = resolve(settings.cache_dir).resolve()
    check_location(cache, "CACHE_DIR", inputs)
    if cache.exists() and not cache.is_dir():
        raise UserError(f"CACHE_DIR={cache} is a file, not a folder; choose a folder (or --CACHE_DIR='' for none)")
    if cache == out or out in cache.parents:
        raise UserError(f"CACHE_DIR={cache} is inside OUTPUT_DIR {out}, whose files are the run's outputs; choose "
                        f"a folder outside it (the default is .cache/tokenized)")
    return out, cache


def check_tracking(settings: TrainSettings, out: Path) -> tuple[list[str], Path | None]:
    """REPORT_TO's trackers (installed?) and, for the file-based ones, TRACKING_DIR against the
    output-safety rule (not an input, not the project root, not inside OUTPUT_DIR, not a file)."""
    chosen = trackers.requested(settings.report_to)
    trackers.check_installed(chosen)
    if not any(t in trackers.FILE_TRACKERS for t in chosen):
        return chosen, None
    where = resolve(settings.tracking_dir or "runs").resolve()
    check_location(where, "TRACKING_DIR", [settings.dataset, settings.model])
    if where.exists() and not where.is_dir():
        raise UserError(f"TRACKING_DIR={where} is a file, not a folder; choose a folder for the tracker files")
    if where == out or out in where.parents:
        raise UserError(f"TRACKING_DIR={where} is inside OUTPUT_DIR {out}, whose files are the run's outputs; choose "
                        f"a folder outside it (the default is runs)")
    existing = where
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"TRACKING_DIR={where}: {existing} is not a writable folder; choose a writable location")
    return chosen, where


def plan_job(settings: TrainSettings) -> TrainJob:
    """Checks, data, splits and the plan: everything decided, nothing written. The job's settings
    are `settings` with what a dpo/orpo run inherits from its start adapter."""
    settings.check()
    start = check_start_adapter(settings)
    settings, inherited = with_inherited(settings, start)
    out, cache = check_outputs(settings)
    chosen, tracking_dir = check_tracking(settings, out)
    try:
        data = load_data(settings.data_spec)
        train_rows, val_rows, note = training_splits(data, settings.train_samples, settings.val_samples,
                                                     settings.data_seed, settings.val_fraction)
    except UnicodeDecodeError as exc:   # a JSON/CSV string that is not UTF-8 surfaces only when rows are read
        raise UserError(f"DATASET {settings.dataset}: not UTF-8 text ({exc.reason} in {exc.object[:40]!r}); "
                        f"re-save the file as UTF-8") from None
    files = [*data.local_files, *([start.weights] if start else [])]
    plan = plan_run(out, settings.recorded, files, str(settings.resume), settings.overwrite)
    return TrainJob(settings, data, train_rows, val_rows, out, cache, plan, note, chosen, tracking_dir, start=start,
                    inherited=inherited)


def already_finished(job: TrainJob) -> dict:
    """The result of a finished run with the same settings (its checkpoints go unless kept)."""
    if job.is_main_process:
        prepare_run_dir(job.plan, job.settings.recorded, job.input_files, job.settings.keep_checkpoints)
    found = job.out / "train_metrics.json"
    metrics = json.loads(found.read_text(encoding="utf-8")) if found.is_file() else {}
    job.say(f"{job.out} already holds a finished run with these settings (best ROUGE-L {metrics.get('best_rougeL')} "
            f"at step {metrics.get('best_step')}); nothing to do. Pass --OVERWRITE=True to train again.")
    return {"output_dir": str(job.out), "already_finished": True, **metrics}
