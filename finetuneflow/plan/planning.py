"""Fine-tuning plans: from a ranking row and a target machine to a method, settings, a time
estimate and a launch script.

A plan per model: its shape (finetuneflow.plan.shapes: the config, else the ranking's columns),
LoRA hyperparameters and targets (the trainer's default table), input/target lengths (the dataset
overview's p99 token counts when there is one), the cheapest method that fits the memory budget
(finetuneflow.plan.memory), a time estimate, and the trainer's `--NAME=value` settings
(finetuneflow.plan.launch checks them against the trainer's own specs).

Training time is an estimate: the benchmark's measured generation throughput (samples/s) is
scaled by the relative speed of the target GPU to the GPU that measured it
(finetuneflow.plan.hardware), and by a train-per-generate factor per method (TRAIN_PER_GENERATE
below). Expect it within about 2x.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.settings import FromConfig
from finetuneflow.plan import launch
from finetuneflow.plan.hardware import GPUS, Target, device_speed, one_line
from finetuneflow.plan.memory import METHOD_NAMES, Workload, choose_method, estimate_memory, gpus_that_fit
from finetuneflow.plan.shapes import ModelShape, default_targets, number, shape_for

MIN_INPUT = 16                 # the trainer's smallest MAX_INPUT_LENGTH
PROMPT_TOKENS = 48             # chat template + instruction around a causal model's dialogue
# Training samples/s per generated sample/s on the same device, without gradient checkpointing
# (checkpointing recomputes the forward pass: x 0.75). Calibrated on the seed's Colab T4 logs:
# Llama-3.2-1B QLoRA with checkpointing trained 8 samples per 8.39 s step (0.95/s) where the
# benchmark generated 0.51 samples/s -> 1.9, i.e. 2.5 without checkpointing. LoRA skips the 4-bit
# dequantisation (~1.3x faster); a full fine-tune adds the weight-gradient matmuls (6P vs 4P FLOPs).
TRAIN_PER_GENERATE = {"qlora": 2.5, "lora": 3.3, "full": 2.2}
# How a dataset is read (same names in inspect_dataset.py, benchmark_models.py and the trainer): a launch
# script passes the ones the data stages used, so training reads the same columns and makes the same split.
DATA_SETTINGS = ("HUB_CONFIG", "DIALOGUE_COLUMN", "SUMMARY_COLUMN", "ID_COLUMN", "VAL_FRACTION", "TEST_FRACTION",
                 "SEED", "NORMALIZE")


@dataclass(frozen=True)
class PlanSettings(FromConfig):
    """recommend_finetune.py's settings (same names, lower case)."""
    top_k: int = 2
    gpu_name: str = ""
    gpu_memory_gb: float | None = None
    memory_margin: float = 0.8
    dataset: str | None = None
    train_samples: int = 2000
    val_samples: int = 200
    epochs: float = 3
    micro_batch: int = 4
    effective_batch: int = 8
    max_input_length: int = 768
    max_target_length: int = 192
    max_input_cap: int = 1024
    max_target_cap: int = 256
    trainer: str = "train_bart_lora.py"

    def __post_init__(self):
        for value, cap in (("MAX_INPUT_LENGTH", "MAX_INPUT_CAP"), ("MAX_TARGET_LENGTH", "MAX_TARGET_CAP")):
            if getattr(self, value.lower()) > getattr(self, cap.lower()):
                raise UserError(f"{value}={getattr(self, value.lower())} is over {cap}={getattr(self, cap.lower())}; "
                                f"lower {value} or raise {cap}")


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Overview:
    """What the plan uses of inspect_dataset.py's dataset_overview.json."""
    dataset: str | None = None
    train_rows: int | None = None
    validation_rows: int | None = None
    dialogue_p99: float | None = None      # tokens
    summary_p99: float | None = None
    tokenizer: str | None = None
    data_settings: dict = field(default_factory=dict)   # DATA_SETTINGS the overview read the dataset with


def _read_text(path: Path, what: str, fix: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")   # no newline translation: a CSV field may hold a \r
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; {fix}") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or first_line(exc)}); {fix}") from None


def _count(data: dict, key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: {key!r} must be a row count, found {one_line(repr(value))[:60]}; re-run "
                        f"inspect_dataset.py")
    return value


def _p99(data: dict, role: str, where: str) -> float | None:
    value = ((data.get("lengths") or {}).get(role) or {}).get("tokens", {}) or {}
    value = value.get("p99") if isinstance(value, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{where}: the {role} p99 token count must be a number >= 0, found "
                        f"{one_line(repr(value))[:60]}; re-run inspect_dataset.py")
    return float(value)


def data_settings_of(overview: dict) -> dict:
    """The DATA_SETTINGS an overview was made with (its "data_settings"; an older overview: the columns
    it found and the fractions of the split it made), None values left out."""
    found = overview.get("data_settings")
    if not isinstance(found, dict):
        columns = overview.get("columns") if isinstance(overview.get("columns"), dict) else {}
        made = overview.get("split_fractions") if isinstance(overview.get("split_fractions"), dict) else {}
        found = {"DIALOGUE_COLUMN": columns.get("dialogue"), "SUMMARY_COLUMN": columns.get("summary"),
                 "ID_COLUMN": columns.get("id"), "VAL_FRACTION": made.get("validation"),
                 "TEST_FRACTION": made.get("test"), "SEED": made.get("seed")}
    return {name: found[name] for name in DATA_SETTINGS if found.get(name) is not None}


def read_overview(path: Path) -> Overview:
    """The overview's dataset, row counts and p99 token lengths; a corrupt file is one clear error."""
    fix = "re-run inspect_dataset.py, or pass --OVERVIEW= to plan without it"
    text = _read_text(path, "OVERVIEW", fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"OVERVIEW {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows", {}), dict) \
            or not isinstance(data.get("lengths", {}), dict):
        raise UserError(f"OVERVIEW {path} is not a dataset overview (a JSON object with rows and lengths); {fix}")
    where = f"OVERVIEW {path}"
    try:
        rows, p99 = data.get("rows") or {}, {role: _p99(data, role, where) for role in ("dialogue", "summary")}
    except AttributeError:
        raise UserError(f"{where}: 'lengths' is not laid out as inspect_dataset.py writes it; {fix}") from None
    dataset, tokenizer = data.get("dataset"), data.get("tokenizer")
    return Overview(str(dataset) if isinstance(dataset, str) else None, _count(rows, "train", where),
                    _count(rows, "validation", where), p99["dialogue"], p99["summary"],
                    str(tokenizer) if isinstance(tokenizer, str) else None, data_settings_of(data))


def read_ranking(path: Path) -> list[dict]:
    """The rows of a ranking CSV (benchmark_models.py's final_ranking.csv); an unreadable, empty or
    foreign file is one clear error."""
    fix = "it should be benchmark_models.py's final_ranking.csv (re-run that stage, or pass --RANKING=<that file>)"
    if path.is_dir():
        raise UserError(f"RANKING={path} is a folder; {fix}")
    text = _read_text(path, "RANKING", fix)
    if not text.strip():
        raise UserError(f"RANKING {path} is empty; {fix}")
    if "\x00" in text:
        raise UserError(f"RANKING {path} is not a CSV text file (it holds NUL bytes); {fix}")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as exc:
        raise UserError(f"RANKING {path} is not a readable CSV ({first_line(exc)}); {fix}") from None
    if "model" not in (reader.fieldnames or []):
        raise UserError(f"RANKING {path} has no 'model' column (columns: "
                        f"{one_line(', '.join(map(str, reader.fieldnames or [])))[:120]}); {fix}")
    return rows


def _composite(row: dict) -> float:
    try:
        value = float(row.get("composite") or "nan")
    except (TypeError, ValueError, OverflowError):
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def select_candidates(rows: list[dict], top_k: int, source: Path) -> tuple[list[dict], dict]:
    """The top_k successful model rows by composite (file order on ties), and what was skipped."""
    skipped = {"failed": 0, "reference baselines": 0, "without a model name": 0}
    ok = []
    for row in rows:
        if (row.get("status") or "ok").strip() != "ok":
            skipped["failed"] += 1
        elif (row.get("kind") or "model").strip() != "model":
            skipped["reference baselines"] += 1
        elif not str(row.get("model") or "").strip():
            skipped["without a model name"] += 1
        else:
            ok.append(row)
    if not ok:
        raise UserError(f"{source} has no successful model rows ({len(rows)} rows: {skipped['failed']} failed, "
                        f"{skipped['reference baselines']} reference baselines); fix the errors in its 'error' column "
                        f"and re-run benchmark_models.py")
    ranked = sorted(enumerate(ok), key=lambda item: (-_composite(item[1]), item[0]))
    return [row for _, row in ranked[:top_k]], {k: v for k, v in skipped.items() if v}


# ----------------------------------------------------------------------------- one plan
@dataclass(frozen=True)
class PlanContext:
    """Everything a plan needs besides the model's row."""
    settings: PlanSettings
    target: Target
    overview: Overview | None
    dataset: str
    train_rows: int | None          # rows the trainer will use (None: unknown, "all rows")
    val_rows: int | None
    trainer: launch.Trainer
    data_settings: dict = field(default_factory=dict)   # DATA_SETTINGS for the trainer (recommend.data_settings)


def rows_to_use(settings: PlanSettings, overview: Overview | None, dataset: str) -> tuple[int | None, int | None]:
    """Training and validation rows: TRAIN_SAMPLES / VAL_SAMPLES, at most what the dataset has
    (when the overview describes this dataset); 0 means all rows (None when nobody knows how many)."""
    known = overview if overview is not None and overview.dataset == dataset else None

    def pick(asked: int, available: int | None) -> int | None:
        if available is None:
            return asked or None
        return min(asked, available) if asked else available
    return pick(settings.train_samples, known and known.train_rows), \
        pick(settings.val_samples, known and known.validation_rows)


def lora_hyperparameters(shape: ModelShape) -> dict:
    """r 8 / alpha 32 under 1B parameters (the seed's BART setting), r 16 / alpha 32 from 1B
    (more capacity for a decoder-only model learning a new output format); lr 2e-4 (1e-4 from
    20B, as in the QLoRA paper); dropout 0.05; the trainer's default targets."""
    big = shape.parameters >= 1e9
    return {"r": 16 if big else 8, "alpha": 32, "dropout": 0.05, "target_modules": default_targets(shape),
            "lr": 1e-4 if shape.parameters >= 2e10 else 2e-4}


def round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def plan_lengths(overview: Overview | None, shape: ModelShape, settings: PlanSettings) -> dict:
    """Input/target lengths: the overview's p99 token counts rounded up to 64, within the caps and
    the model's position limit; MAX_INPUT_LENGTH / MAX_TARGET_LENGTH when there is no overview."""
    notes = []
    if overview is not None and overview.dialogue_p99 and overview.summary_p99:
        source = "dataset overview p99"
        wanted = overview.dialogue_p99 + (PROMPT_TOKENS if shape.family == "causal" else 0)
        input_len = min(settings.max_input_cap, max(128, round_up(wanted, 64)))
        target_len = min(settings.max_target_cap, max(32, round_up(overview.summary_p99 + 1, 64)))
        if overview.dialogue_p99 > input_len:
            notes.append(f"p99 dialogue is {overview.dialogue_p99:.0f} tokens; capped at {input_len} (longer "
                         f"dialogues are cut)")
    else:
        source, input_len, target_len = "defaults", settings.max_input_length, settings.max_target_length
    if shape.max_positions:
        room = shape.max_positions - (0 if shape.family == "seq2seq" else target_len)
        if room < MIN_INPUT:
            raise UserError(f"the model has {shape.max_positions} positions and a {target_len}-token summary leaves "
                            f"{max(room, 0)} for the input; lower --MAX_TARGET_LENGTH / --MAX_TARGET_CAP")
        if input_len > room:
            input_len = room
            notes.append(f"input cut to {room} tokens to fit the model's {shape.max_positions} positions")
    return {"max_input_length": int(input_len), "max_target_length": int(target_len), "source": source,
            "tokenizer": overview.tokenizer if overview else None, "notes": notes}


def estimate_time(samples_per_s: float | None, bench_device: str | None, target: Target, method: str,
                  train_rows: int | None, val_rows: int | None, epochs: float, checkpointing: bool = False) -> dict:
    """Minutes per epoch (training + one validation pass) and in total (plus the zero-shot
    evaluation before training), scaled from the measured generation speed; gradient
    checkpointing recomputes the forward pass (x 0.75)."""
    if not samples_per_s:
        return {"available": False, "why": "the ranking has no measured samples/s for this model"}
    if train_rows is None:
        return {"available": False, "why": "TRAIN_SAMPLES=0 means all rows and no dataset overview says how many"}
    bench_key, bench_speed = device_speed(bench_device)
    if not bench_device or bench_device == target.name or (bench_key is not None and bench_key == target.key):
        scale = 1.0   # measured on this kind of device (a ranking without a device column is assumed so)
    elif bench_speed and target.relative_speed:
        scale = target.relative_speed / bench_speed
    else:
        return {"available": False, "why": f"cannot scale a measurement on {one_line(bench_device)[:60]} to "
                                            f"{target.name}: re-run benchmark_models.py on the target machine, or "
                                            f"plan for one of {', '.join(GPUS)} from a benchmark run on one of them"}
    generate = samples_per_s * scale
    train = generate * TRAIN_PER_GENERATE[method] * (0.75 if checkpointing else 1.0)
    train_min, eval_min = train_rows / train / 60, (val_rows or 0) / generate / 60
    if not math.isfinite(train_min + eval_min) or train_min + eval_min > 1e9:
        return {"available": False, "why": f"the measured {samples_per_s:g} samples/s gives no usable estimate"}
    return {"available": True, "label": "estimate (expect within ~2x)", "measured_samples_per_s": samples_per_s,
            "measured_on": one_line(bench_device or f"{target.name} (assumed: the ranking names no device)"),
            "speed_scale": round(scale, 3),
            "train_samples_per_s": round(train, 3), "train_minutes_per_epoch": round(train_min, 1),
            "eval_minutes_per_epoch": round(eval_min, 1), "minutes_per_epoch": round(train_min + eval_min, 1),
            "total_minutes": round((train_min + eval_min) * epochs + eval_min, 1)}


def _asked(rows: int | None, setting: int) -> int:
    return rows if rows is not None else setting


def trainer_flags(plan: dict, shape: ModelShape, hyper: dict, ctx: PlanContext) -> dict:
    """The trainer's settings for this plan (before they are checked against its specs)."""
    settings = ctx.settings
    flags = {"MODEL": plan["source"], "DATASET": ctx.dataset, **ctx.data_settings,
             "TRAIN_SAMPLES": _asked(ctx.train_rows, settings.train_samples),
             "VAL_SAMPLES": _asked(ctx.val_rows, settings.val_samples), "EPOCHS": settings.epochs,
             "BATCH_SIZE": plan["micro_batch"], "GRAD_ACCUM": plan["grad_accum"], "LEARNING_RATE": hyper["lr"],
             "MAX_INPUT_LENGTH": plan["lengths"]["max_input_length"],
             "MAX_TARGET_LENGTH": plan["lengths"]["max_target_length"], "LORA_R": hyper["r"],
             "LORA_ALPHA": hyper["alpha"], "LORA_DROPOUT": hyper["dropout"],
             "TARGET_MODULES": ",".join(hyper["target_modules"]), "LOAD_IN_4BIT": plan["method"] == "qlora",
             "GRADIENT_CHECKPOINTING": plan["gradient_checkpointing"]}
    if shape.family == "causal":   # greedy, as the benchmark generated; 4 beams would quadruple eval time
        flags["NUM_BEAMS"] = 1
    flags["OUTPUT_DIR"] = f"ft_outputs/{launch.slug(plan['model'])}_{plan['method']}"
    return flags


def _plan_facts(row: dict, shape: ModelShape, size_from: str, ctx: PlanContext, choice: dict, lengths: dict,
                hyper: dict, work: Workload) -> dict:
    batch, checkpointing = choice["micro_batch"], choice["gradient_checkpointing"]
    return {"model": str(row["model"]), "source": str(row.get("source") or row["model"]),
            "parameters": shape.parameters, "size_from": size_from, "family": shape.family,
            "model_type": shape.model_type, "target": ctx.target.name, "memory_gb": round(ctx.target.memory_gb, 1),
            "budget_gb": choice["budget_gb"], "method": choice["method"], "fits": choice["fits"],
            "micro_batch": batch, "gradient_checkpointing": checkpointing,
            "grad_accum": max(1, math.ceil(ctx.settings.effective_batch / batch)),
            "memory": {m: estimate_memory(shape, m, batch, work, ctx.target.device, checkpointing)
                       for m in ("full", "lora", "qlora")},
            "search": choice["tried"], "lengths": lengths,
            "lora": {k: hyper[k] for k in ("r", "alpha", "dropout", "target_modules")},
            "learning_rate": hyper["lr"], "epochs": ctx.settings.epochs, "train_samples": ctx.train_rows,
            "val_samples": ctx.val_rows,
            "benchmark": {k: row.get(k) for k in ("rougeL", "samples_per_s", "composite", "device")}}


def plan_model(row: dict, ctx: PlanContext) -> dict:
    """Size, lengths, method and micro-batch, memory table, time and (when it fits) the trainer's
    settings for one ranking row."""
    shape, size_from = shape_for(row)
    hyper = lora_hyperparameters(shape)
    lengths = plan_lengths(ctx.overview, shape, ctx.settings)
    work = Workload(lengths["max_input_length"], lengths["max_target_length"], hyper["r"],
                    tuple(hyper["target_modules"]))
    choice = choose_method(shape, ctx.target, ctx.settings.micro_batch, work, ctx.settings.memory_margin)
    plan = _plan_facts(row, shape, size_from, ctx, choice, lengths, hyper, work)
    if not choice["fits"]:
        fits_on = gpus_that_fit(shape, ctx.settings.micro_batch, work, ctx.settings.memory_margin)
        plan["time"] = {"available": False, "why": "nothing fits"}
        plan["needs"] = (f"no method fits in {choice['budget_gb']} GB even at micro-batch 1; fits on: "
                         f"{', '.join(fits_on) or 'none of the listed GPUs'}")
        return plan
    plan["time"] = estimate_time(number(row, "samples_per_s"), row.get("device"), ctx.target, plan["method"],
                                 ctx.train_rows, ctx.val_rows, ctx.settings.epochs, plan["gradient_checkpointing"])
    plan["flags"], plan["dropped_flags"] = launch.check_flags(trainer_flags(plan, shape, hyper, ctx), ctx.trainer)
    plan["adapter_dir"] = plan["flags"].get("OUTPUT_DIR")
    return plan


def script_header(plan: dict) -> list[str]:
    memory, timing = plan["memory"][plan["method"]], plan["time"]
    return [f"Fine-tune {plan['model']} with {METHOD_NAMES[plan['method']]} on {plan['target']} "
            f"({plan['memory_gb']:g} GB) - written by recommend_finetune.py.",
            f"Estimated peak memory {memory['total']} GB of a {plan['budget_gb']} GB budget; "
            + (f"time ~{timing['minutes_per_epoch']} min per epoch (estimate)." if timing["available"] else
               f"no time estimate ({timing['why']}).")]


def make_plans(candidates: list[dict], ctx: PlanContext, out_dir: Path) -> tuple[list[dict], dict[str, str]]:
    """A plan per candidate (a model that cannot be planned gets its error instead) and the launch
    script text of each plan that fits, by file name."""
    plans, scripts, taken = [], {}, set()
    for row in candidates:
        try:
            plan = plan_model(row, ctx)
        except UserError as exc:
            plans.append({"model": str(row.get("model")), "source": str(row.get("source") or row.get("model")),
                          "fits": False, "error": str(exc)})
            continue
        if plan["fits"]:
            name = launch.script_name(plan["model"], taken)
            scripts[name] = launch.launch_script(plan["flags"], script_header(plan), out_dir / name, ctx.trainer.path)
            plan["script"] = str(out_dir / name)
        plans.append(plan)
    if all("error" in p for p in plans):
        raise UserError(f"no model in the ranking could be planned: {plans[0]['model']!r}: {plans[0]['error']}")
    return plans, scripts
