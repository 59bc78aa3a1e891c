"""The evaluation stage's plan (eval_bart_lora.py), made before any model loads and before anything
is written: which model, its kind and tag, the settings it inherits from its run record, the
output files (checked by the output-safety rule), the rows, and the rows it was trained on.

Settings left at None come from the model's run record (decoding, instruction, input length, the
split), then from `FALLBACKS`; the result is a new settings dict (the stage's own is never edited)
that the run record stores and a typed `EvalSettings` the run reads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.data import DataSpec, LoadedData, get_split, load_data, subset, training_overlap
from finetuneflow.contract.decoding import DecodingFields, GenerationSettings, LongInput
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import FT_OUTPUTS, resolve
from finetuneflow.contract.record import RunRecord, read_record
from finetuneflow.contract.safety import check_output_file
from finetuneflow.contract.settings import Config, FromConfig
from finetuneflow.model.loading import is_adapter_dir

STAGE = "eval"
DEFAULT_MODEL = f"{FT_OUTPUTS}/bart_lora_highlightsum"     # train_bart_lora.py's default output
INHERITED = (*GenerationSettings.names(), "INSTRUCTION", "MAX_INPUT_LENGTH", "LOAD_IN_4BIT", "NORMALIZE", "SEED",
             "VAL_FRACTION", "TEST_FRACTION")
FALLBACKS = {"SEED": 42, "VAL_FRACTION": 0.1, "TEST_FRACTION": 0.1, "NORMALIZE": False, "LOAD_IN_4BIT": False}
KIND_OF_STAGE = {"merge_bart_lora": "merged", "post_merge_cleanup": "merged", "export_gguf": "exported"}
OUTPUTS = ("predictions.csv", "eval.json", "run_config.json")


@dataclass(frozen=True)
class EvalSettings(FromConfig, DecodingFields):
    """The stage's settings once resolved (lower-case names of eval_bart_lora.py's settings block)."""
    model: str
    tag: str
    dataset: str
    split: str
    n_samples: int
    shuffle: bool
    seed: int
    max_input_length: int | None
    instruction: str | None
    long_input: str
    batch_size: int
    load_in_4bit: bool
    device: str | None
    precision: str
    wandb: bool
    allow_overlap: bool
    output_dir: str
    overwrite: bool = False


@dataclass
class EvalPlan:
    """What one evaluation reads and writes, decided before the model loads."""
    config: Config                    # the resolved settings (what the run record stores)
    settings: EvalSettings
    long_input: LongInput
    record: RunRecord | None          # the model's run record
    kind: str                         # base | adapter | merged | exported
    inherited: list[str]              # settings filled from the model's run record
    paths: dict                       # kind -> output file
    data: LoadedData
    rows: list[dict]
    overlap: list[str]                # rows the model was trained on (only with ALLOW_OVERLAP)
    inputs: list                      # what the run record hashes


def model_record(model: str) -> RunRecord | None:
    """The run record beside the model (a folder, or a sidecar beside a .gguf file)."""
    path = resolve(model)
    if path.is_dir():
        return read_record(path)
    if path.is_file():
        return read_record(path.parent, f"{path.stem}.run_config.json")
    return None


def model_kind(model: str, record: RunRecord | None) -> str:
    if is_adapter_dir(model):
        return "adapter"
    return KIND_OF_STAGE.get(record.stage, "base") if record is not None else "base"


def default_model() -> str:
    folder = resolve(DEFAULT_MODEL)
    if not folder.is_dir():
        raise UserError(f"MODEL is not set and {folder} does not exist (it is written by `python "
                        f"train_bart_lora.py`); train first, or pass --model=<base id, adapter or merged "
                        f"folder>, e.g. --model=facebook/bart-large-cnn --tag=baseline")
    return str(folder)


def resolved_config(cfg: Config, record: RunRecord | None, **given) -> tuple[Config, list[str]]:
    """A new settings dict: `cfg` with `given`, then what is still None from the model's record,
    then the fallbacks; and the names the record filled."""
    config = Config({**cfg, **given})
    config.meta.update(cfg.meta)
    inherited = record.inherit_into(config, INHERITED) if record else []
    config.update({name: value for name, value in FALLBACKS.items() if config[name] is None})
    return config, inherited


def check_overlap(settings: EvalSettings, rows: list[dict], record: RunRecord | None) -> list[str]:
    """Refuse rows the model was trained on (unless ALLOW_OVERLAP); returns their ids."""
    overlap = training_overlap(rows, record.split if record else None) or []
    if overlap and not settings.allow_overlap:
        raise UserError(f"{len(overlap)} of {len(rows)} {settings.split} rows of {settings.dataset} are rows "
                        f"{settings.model} was trained on (e.g. id {overlap[0]!r}); evaluate a held-out split "
                        f"(--split=test or validation, with the training SEED/fractions), or pass "
                        f"--ALLOW_OVERLAP=True to score them anyway (flagged)")
    return overlap


def output_paths(settings: EvalSettings, inputs: list[Path]) -> dict:
    """`<TAG>_predictions.csv`, `_eval.json`, `_run_config.json`, each checked before any work."""
    out = resolve(settings.output_dir)
    paths = {kind: out / f"{settings.tag}_{kind}" for kind in OUTPUTS}
    for path in paths.values():
        check_output_file(path, stage=STAGE, setting="OUTPUT_DIR", marker=paths["run_config.json"], inputs=inputs)
    # the part files of a resumable run (quality/eval_parts.py) are checked by the same rule
    check_output_file(paths["predictions.csv"].with_name(f"{settings.tag}_predictions.part-0.jsonl"), stage=STAGE,
                      setting="OUTPUT_DIR", marker=paths["run_config.json"], inputs=inputs)
    return paths


def check_decoding(settings: EvalSettings, model: str) -> None:
    """Decoding that contradicts itself or that the model's runtime cannot run: one line, before
    anything is written (DECODING=beam on llama.cpp, MBR_UTILITY=minilm without the encoder, ...)."""
    from finetuneflow.model.backends import backend_for
    from finetuneflow.quality.mbr import check_utility
    generation = settings.generation()        # contradictions between the settings raise here
    path = resolve(model)
    backend_for(path if path.exists() else model).refuse_unsupported(generation)
    if generation.decoding == "mbr":
        check_utility(generation.mbr_utility)


def plan_evaluation(cfg: Config) -> EvalPlan:
    """The model, its kind and tag, the inherited settings, the outputs, the rows: nothing written."""
    model = cfg.MODEL or default_model()
    record = model_record(model)
    kind = model_kind(model, record)
    tag = cfg.TAG or {"adapter": "lora", "base": "baseline"}.get(kind, kind)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", tag):
        raise UserError(f"--tag={tag!r} must be a file-name-safe word (letters, digits, _ . -)")
    config, inherited = resolved_config(cfg, record, MODEL=model, TAG=tag)
    if config["DECODING"] == "mbr" and config["MBR_SEED"] is None:
        config["MBR_SEED"] = config["SEED"]         # MBR_SEED None: the run's SEED
    settings = EvalSettings.from_config(config)
    check_decoding(settings, model)
    model_path = resolve(model)
    paths = output_paths(settings, [model_path, resolve(settings.dataset)])
    data = load_data(DataSpec.from_config(config))
    rows = list(subset(get_split(data, settings.split), settings.n_samples, settings.seed, shuffle=settings.shuffle))
    overlap = check_overlap(settings, rows, record)
    inputs = [*data.local_files, model_path if model_path.exists() else model]
    return EvalPlan(config, settings, LongInput.parse(settings.long_input), record, kind, inherited, paths, data,
                    rows, overlap, inputs)
