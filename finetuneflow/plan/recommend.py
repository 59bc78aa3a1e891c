"""The recommend stage as a whole: its inputs (ranking, overview, trainer), its output folder
(shared with the benchmark: finetuneflow.plan.outputs) and the files it writes there."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord
from finetuneflow.plan import launch, planning
from finetuneflow.plan.outputs import BENCHMARK, RECOMMEND, RECORDS, StageFolder, open_stage_folder
from finetuneflow.plan.plan_report import plan_markdown

FILES = ["recommendations.json", "finetune_plan.md"]
FALLBACK_DATASET = "knkarthick/highlightsum"


def load_overview(setting: str, default: str) -> tuple[Path | None, planning.Overview | None, str]:
    """(path, overview, note). OVERVIEW="" plans without one; the default file may be missing (the
    plan then uses MAX_INPUT_LENGTH / MAX_TARGET_LENGTH and says so); a file the user named must exist."""
    if not setting.strip():
        return None, None, "OVERVIEW is empty: lengths from MAX_INPUT_LENGTH / MAX_TARGET_LENGTH"
    path = resolve(setting)
    if not path.exists():
        if setting != default:
            raise UserError(f"OVERVIEW={setting}: {path} does not exist (inspect_dataset.py writes it); fix the path, "
                            f"or pass --OVERVIEW= to plan without it")
        return None, None, f"no dataset overview at {path}: lengths from MAX_INPUT_LENGTH / MAX_TARGET_LENGTH"
    if path.is_dir():
        raise UserError(f"OVERVIEW={setting}: {path} is a folder; pass inspect_dataset.py's dataset_overview.json")
    return path, planning.read_overview(path), f"lengths and row counts from {path}"


def _benchmark_record(ranking: Path) -> dict:
    """benchmark_models.py's record beside the ranking ({} when there is none or it is damaged: it
    is only a hint here)."""
    record = ranking.parent / RECORDS[BENCHMARK]
    try:
        data = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) and data.get("stage") == BENCHMARK else {}


def pick_dataset(settings: planning.PlanSettings, overview: planning.Overview | None, ranking: Path) -> str:
    """DATASET, else the overview's dataset, else the benchmark's, else HighlightSum (the seed's)."""
    if settings.dataset:
        return settings.dataset
    if overview is not None and overview.dataset:
        return overview.dataset
    found = _benchmark_record(ranking).get("dataset")   # first-wave records keep "dataset" at the top level too
    return str(found) if isinstance(found, str) and found else FALLBACK_DATASET


def same_dataset(a: str | None, b: str | None) -> bool:
    """The same Hub id, or the same local file however its path is written."""
    if not a or not b:
        return False
    try:
        return a == b or (resolve(a).exists() and resolve(a).resolve() == resolve(b).resolve())
    except (OSError, ValueError):   # not a usable path (a NUL byte, too long): only the same text counts
        return False


def data_settings(dataset: str, overview: planning.Overview | None, ranking: Path) -> tuple[dict, str]:
    """(planning.DATA_SETTINGS for the trainer, where they come from): how inspect_dataset.py read
    `dataset` (its overview), else how benchmark_models.py read it (its record); {} when neither did."""
    if overview is not None and same_dataset(overview.dataset, dataset):
        return dict(overview.data_settings), "the dataset overview"
    record = _benchmark_record(ranking)
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    if same_dataset(config.get("DATASET") if isinstance(config.get("DATASET"), str) else None, dataset):
        return ({k: config[k] for k in planning.DATA_SETTINGS if config.get(k) is not None},
                f"the benchmark's record ({RECORDS[BENCHMARK]})")
    return {}, "none (no overview or benchmark read this dataset: the trainer's defaults)"


def local_sources(candidates: list[dict]) -> list[Path]:
    """The model folders the ranking names (inputs the plan must not write into)."""
    found = []
    for row in candidates:
        source = str(row.get("source") or row.get("model") or "")
        if source and "\x00" not in source:
            try:
                path = resolve(source)
                if path.exists():
                    found.append(path)
            except (OSError, ValueError):
                continue
    return found


def open_output(output_dir: str, ranking: Path, overview: Path | None, trainer: launch.Trainer,
                candidates: list[dict]) -> StageFolder:
    """OUTPUT_DIR checked before anything is written: the ranking (and overview) may sit in it,
    nothing else of the user's may, and it is never a protected place or inside an input."""
    inputs = [ranking, overview, trainer.path, *local_sources(candidates)]
    return open_stage_folder(output_dir, RECOMMEND, inputs=inputs, shared_inputs=[ranking, overview])


def write_outputs(folder: StageFolder, plans: list[dict], scripts: dict[str, str], ctx: planning.PlanContext,
                  meta: dict, cfg: dict, inputs: list) -> dict:
    """recommendations.json, finetune_plan.md, the launch scripts and the record (rules in
    finetuneflow.plan.outputs); returns the result and the earlier scripts removed or kept."""
    names = FILES + sorted(scripts)
    folder.check_files(names + ([folder.record_name] if folder.previous is None else []))
    record = RunRecord(RECOMMEND, extra={"target": ctx.target.name, "dataset": ctx.dataset,
                                         "plans": [p["model"] for p in plans]})
    folder.claim(names, record, cfg, inputs)
    for name, text in scripts.items():
        atomic_write_text(folder.path / name, text)
        os.chmod(folder.path / name, 0o755 & ~_umask())
    result = {"target": asdict(ctx.target), "memory_margin": ctx.settings.memory_margin, "dataset": ctx.dataset,
              "data_settings": ctx.data_settings,
              "ranking": meta["ranking"], "overview": meta["overview"],
              "time_label": "estimates, scaled from measured generation speed (expect within ~2x)",
              "recommendations": plans}
    atomic_write_json(folder.path / "recommendations.json", result)
    atomic_write_text(folder.path / "finetune_plan.md", plan_markdown(plans, scripts, ctx.target, meta))
    removed, kept = folder.finish(names, record, cfg, inputs)
    return {**result, "removed": removed, "kept": kept}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
