"""Stage 6 - evaluate one model version on a dialogue split: predictions, ROUGE and speed.

Reads:  MODEL (a base model id/folder, an adapter folder from train_bart_lora.py, or a merged
        folder from merge_bart_lora.py / post_merge_cleanup.py; the kind is detected) and DATASET
Writes: metrics/<TAG>_predictions.csv   id, dialogue, reference, prediction, rouge1, rouge2, rougeL,
                                        rougeLsum, pred_words, ref_words (ROUGE F1 x 100)
        metrics/<TAG>_eval.json         averages, counts, generation settings, timing, device
        metrics/<TAG>_run_config.json

Run as:
    python eval_bart_lora.py                                   # the adapter in ft_outputs/bart_lora_highlightsum
    python eval_bart_lora.py --model=facebook/bart-large-cnn --tag=baseline
    python eval_bart_lora.py --model=ft_outputs/bart_merged_clean --tag=merged
    python eval_bart_lora.py --model=ft_outputs/gguf/<name>-q4_k_m.gguf --tag=q4   # an exported model
    accelerate launch --multi_gpu --num_processes 2 eval_bart_lora.py --model=...   # sharded (see below)
Settings left at None come from the model's run record (run_config.json): the generation settings,
instruction and input length training used, and the split (SEED, VAL_FRACTION, TEST_FRACTION,
NORMALIZE), so the held-out rows are the ones training held out. Rows the model was trained on are
refused (ALLOW_OVERLAP=True scores them anyway and flags the result). Decoding is deterministic, so
a different BATCH_SIZE gives the same predictions. Then compare versions with eval_metrics_bart_lora.py.

Sharded: under `accelerate launch --num_processes N` (N GPUs, or N CPU processes over gloo with
--multi_gpu) each process generates whole batches of the rows and the main process writes the one
predictions CSV, identical to a one-process run. PRECISION picks the weights' dtype (recorded in
the eval json and the run record).

Long inputs (LONG_INPUT): truncate cuts them at MAX_INPUT_LENGTH; chunk summarizes windows cut at turn
boundaries, then summarizes the joined window summaries (map-reduce: one short summary); chunk_join
keeps the window summaries, joined in order, as the summary (its length grows with the input, like
the long abstracts of meeting datasets); error refuses them.
"""
MODEL = None                   # [str | None] base, adapter, merged or exported model; None: the trained adapter
TAG = None                     # [str | None] output name: baseline, lora, merged, ...; None: from the model kind
DATASET = "knkarthick/highlightsum"  # Hub id or local .jsonl/.json/.csv/.parquet file or folder
HUB_CONFIG = None              # [str | None] Hub dataset configuration name, if it has several
DIALOGUE_COLUMN = None         # [str | None] None: auto-detect (dialogue, dialog, text, ...)
SUMMARY_COLUMN = None          # [str | None] None: auto-detect (summary, highlights, human_summary, ...)
ID_COLUMN = None               # [str | None] None: auto-detect (id, sample_id, fname); row numbers when absent
SPLIT = "validation"           # split to evaluate (one local file is split by SEED/fractions); all: every row
N_SAMPLES = 200                # [int >= 0] rows evaluated (0 = all)
SHUFFLE = False                # False: the first N_SAMPLES rows (as the seed did); True: a SEED-shuffled subset
SEED = None                    # [int >= 0 | None] split/shuffle seed; None: the model's training seed, else 42
VAL_FRACTION = None            # [0 <= float < 1 | None] validation share of one local file; None: training's, else 0.1
TEST_FRACTION = None           # [0 <= float < 1 | None] test share of one local file; None: training's, else 0.1
NORMALIZE = None               # [bool | None] rewrite '#Person1#' tags / \r\n like training; None: inherit, else False
NUM_BEAMS = None               # [int >= 1 | None] beams; None: inherit, else the model's config (1 for causal)
MAX_NEW_TOKENS = None          # [int >= 1 | None] summary token limit; None: inherit, else the model's (128 causal)
MIN_NEW_TOKENS = None          # [int >= 0 | None] minimum summary tokens; None: inherit, else the model's config
NO_REPEAT_NGRAM_SIZE = None    # [int >= 0 | None] no repeated n-grams of this size; None: inherit, else the model's
LENGTH_PENALTY = None          # [float | None] beam length penalty (>1 favours longer); None: inherit, else the model's
MAX_INPUT_LENGTH = None        # [int >= 16 | None] input tokens per dialogue; None: inherit, else the model's limit
INSTRUCTION = None             # [str | None] prompt for causal models; None: inherit, else the default instruction
LONG_INPUT = "truncate"        # [truncate | chunk | chunk_join | error] inputs over MAX_INPUT_LENGTH (see --help)
BATCH_SIZE = 8                 # [int >= 1] dialogues per generate() call (halved automatically on GPU out-of-memory)
LOAD_IN_4BIT = None            # [bool | None] load the base in 4-bit (QLoRA); None: inherit from training, else False
DEVICE = None                  # [str | None] None: cuda when available, else cpu; or cpu / cuda:0
PRECISION = "auto"             # [auto | fp32 | bf16] weights; auto: bf16 on GPUs, fp32 on CPUs (see --help)
WANDB = True                   # log to W&B when WANDB_API_KEY or WANDB_MODE=offline is set; False: never
ALLOW_OVERLAP = False          # score rows the model was trained on anyway (flagged in every output)
OUTPUT_DIR = "metrics"         # where the predictions, eval json and run config go

import re
import time
from dataclasses import dataclass

from finetuneflow.contract.data import DataSpec, get_split, load_data, subset, training_overlap
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.contract.paths import FT_OUTPUTS, resolve
from finetuneflow.contract.record import Lineage, RunRecord, portable, read_record, write_record
from finetuneflow.contract.safety import check_output_file
from finetuneflow.contract.settings import configure

STAGE = "eval"
TRAIN_OUTPUT = f"{FT_OUTPUTS}/bart_lora_highlightsum"
INHERITED = (*GenerationSettings.names(), "INSTRUCTION", "MAX_INPUT_LENGTH", "LOAD_IN_4BIT", "NORMALIZE", "SEED",
             "VAL_FRACTION", "TEST_FRACTION")
FALLBACKS = {"SEED": 42, "VAL_FRACTION": 0.1, "TEST_FRACTION": 0.1, "NORMALIZE": False, "LOAD_IN_4BIT": False}


def model_record(model: str) -> RunRecord | None:
    """The run record beside the model (a folder, or a sidecar beside a .gguf file)."""
    path = resolve(model)
    if path.is_dir():
        return read_record(path)
    if path.is_file():
        return read_record(path.parent, f"{path.stem}.run_config.json")
    return None


def model_kind(model: str, record: RunRecord | None) -> str:
    from finetuneflow.model.loading import is_adapter_dir
    if is_adapter_dir(model):
        return "adapter"
    if record is None:
        return "base"
    return {"merge_bart_lora": "merged", "post_merge_cleanup": "merged", "export_gguf": "exported"}.get(record.stage,
                                                                                                    "base")


def resolve_model_and_tag(cfg) -> RunRecord | None:
    if cfg.MODEL is None:
        default = resolve(TRAIN_OUTPUT)
        if not default.is_dir():
            raise UserError(f"MODEL is not set and {default} does not exist (it is written by `python "
                            f"train_bart_lora.py`); train first, or pass --model=<base id, adapter or merged "
                            f"folder>, e.g. --model=facebook/bart-large-cnn --tag=baseline")
        cfg.MODEL = str(default)
    record = model_record(cfg.MODEL)
    if cfg.TAG is None:
        kind = model_kind(cfg.MODEL, record)
        cfg.TAG = {"adapter": "lora", "base": "baseline"}.get(kind, kind)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", cfg.TAG):
        raise UserError(f"--tag={cfg.TAG!r} must be a file-name-safe word (letters, digits, _ . -)")
    return record


def check_overlap(cfg, rows: list[dict], record: RunRecord | None) -> list[str]:
    """Refuse rows the model was trained on (unless ALLOW_OVERLAP); returns their ids."""
    overlap = training_overlap(rows, record.split if record else None) or []
    if overlap and not cfg.ALLOW_OVERLAP:
        raise UserError(f"{len(overlap)} of {len(rows)} {cfg.SPLIT} rows of {cfg.DATASET} are rows {cfg.MODEL} was "
                        f"trained on (e.g. id {overlap[0]!r}); evaluate a held-out split (--split=test or "
                        f"validation, with the training SEED/fractions), or pass --ALLOW_OVERLAP=True to score "
                        f"them anyway (flagged)")
    return overlap


@dataclass
class EvalPlan:
    """What one evaluation reads and writes, decided before the model loads."""
    record: RunRecord | None          # the model's run record
    inherited: list[str]
    paths: dict                       # kind -> output file
    data: object                      # LoadedData
    rows: list[dict]
    overlap: list[str]                # rows the model was trained on (only with ALLOW_OVERLAP)
    inputs: list


def prepare(cfg) -> EvalPlan:
    record = resolve_model_and_tag(cfg)
    inherited = record.inherit_into(cfg, INHERITED) if record else []
    for name, value in FALLBACKS.items():
        if cfg[name] is None:
            cfg[name] = value
    out, model_path = resolve(cfg.OUTPUT_DIR), resolve(cfg.MODEL)
    paths = {kind: out / f"{cfg.TAG}_{kind}" for kind in ("predictions.csv", "eval.json", "run_config.json")}
    for path in paths.values():
        check_output_file(path, stage=STAGE, setting="OUTPUT_DIR", marker=paths["run_config.json"],
                          inputs=[model_path, resolve(cfg.DATASET)])
    data = load_data(DataSpec.from_config(cfg))
    rows = list(subset(get_split(data, cfg.SPLIT), cfg.N_SAMPLES, cfg.SEED, shuffle=cfg.SHUFFLE))
    overlap = check_overlap(cfg, rows, record)
    inputs = [*data.local_files, model_path if model_path.exists() else cfg.MODEL]
    return EvalPlan(record, inherited, paths, data, rows, overlap, inputs)


def describe_model(cfg, loaded, plan: EvalPlan, load_seconds: float, precision, shard) -> dict:
    record = plan.record
    return {"name": portable(cfg.MODEL), "base": portable(loaded.base), "adapter": portable(loaded.adapter),
            "family": loaded.family, "kind": model_kind(cfg.MODEL, record), "backend": loaded.backend.name,
            "dtype": loaded.dtype, "precision": {**precision.as_dict(), "dtype": loaded.dtype},
            "lineage": {k: v for k, v in vars(record.lineage).items() if v} if record else {},
            "load_in_4bit": bool(cfg.LOAD_IN_4BIT), "load_seconds": round(load_seconds, 2), "processes": shard.world}


def device_of(cfg, shard) -> str | None:
    """DEVICE, else the GPU accelerate gave this process in a sharded run (None: the default)."""
    return cfg.DEVICE if cfg.DEVICE or not shard.device else shard.device


def load(cfg, shard, precision):
    """The model, in the precision PRECISION resolved to, on this process's device."""
    from finetuneflow.model.loading import load_model
    started = time.perf_counter()
    loaded = load_model(cfg.MODEL, load_in_4bit=bool(cfg.LOAD_IN_4BIT), device=device_of(cfg, shard),
                        dtype=precision.dtype)
    return loaded, time.perf_counter() - started


def evaluate(cfg, plan: EvalPlan, shard, precision) -> tuple[dict | None, object]:
    """Generate, score and write the predictions, the eval json and the finished run record (in a
    sharded run: the main process; the others generate their share and return None)."""
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    from finetuneflow.quality import tracking
    from finetuneflow.quality.evaluation import evaluate_rows
    out = plan.paths["run_config.json"].parent
    loaded, load_seconds = load(cfg, shard, precision)
    run = tracking.start_run("eval", cfg, out, name=cfg.TAG) if cfg.WANDB and shard.main else None
    try:
        report = evaluate_rows(loaded, plan.rows, GenerationSettings.from_config(cfg), cfg.BATCH_SIZE,
                               cfg.MAX_INPUT_LENGTH, cfg.INSTRUCTION or DEFAULT_INSTRUCTION, cfg.LONG_INPUT,
                               plan.paths["predictions.csv"], cfg.TAG, progress=True, shard=shard)
        if report is None:
            return None, loaded
        summary = report.record
        summary.update(model=describe_model(cfg, loaded, plan, load_seconds, precision, shard),
                       dataset={"source": portable(plan.data.source), "split": cfg.SPLIT, "rows": len(plan.rows),
                                "n_samples": cfg.N_SAMPLES, "shuffle": cfg.SHUFFLE, "seed": cfg.SEED,
                                "columns": plan.data.columns, "dropped_empty_rows": plan.data.dropped},
                       training_overlap={"rows": len(plan.overlap), "ids": plan.overlap[:50],
                                         "allowed": bool(plan.overlap)},
                       inherited_from_model_record=plan.inherited)
        decoding = summary["generation"]
        finished = RunRecord(STAGE, family=loaded.family, backend=loaded.backend.name, dtype=loaded.dtype,
                             instruction=decoding.get("instruction"), max_input_length=decoding["max_input_length"],
                             lineage=plan.record.lineage if plan.record else Lineage(),
                             generation=GenerationSettings.from_record(decoding),
                             extra={"tag": cfg.TAG, "status": "finished", "decoding": decoding,
                                    "precision": summary["model"]["precision"], "processes": shard.world,
                                    "predictions_sha256": summary["predictions_sha256"]})
        atomic_write_json(plan.paths["eval.json"], summary)
        write_record(out, finished, cfg, plan.inputs, name=plan.paths["run_config.json"].name)
        tracking.log(run, {**{f"eval/{k}": v for k, v in summary["averages"].items()},
                           "eval/samples_per_s": summary["timing"]["samples_per_s"],
                           "eval/tokens_per_s": summary["timing"]["tokens_per_s"]})
        if run is not None:
            report.log_table(run)
    finally:
        tracking.finish(run)
    return summary, loaded


def print_summary(cfg, summary: dict, plan: EvalPlan, loaded) -> None:
    avg, counts, timing = summary["averages"], summary["counts"], summary["timing"]
    print(f"model {cfg.MODEL} ({summary['model']['kind']}, {loaded.family}, {loaded.backend.name}) on "
          f"{loaded.device}; {counts['samples']} {cfg.SPLIT} rows of {plan.data.source}")
    if plan.inherited:
        print(f"  inherited from the model's run record: {', '.join(plan.inherited)}")
    if plan.overlap:
        print(f"  WARNING: {len(plan.overlap)} of these rows were training rows (ALLOW_OVERLAP=True): the scores "
              f"are not held-out scores")
    print(f"  generation: {summary['generation']}")
    print(f"  ROUGE-1 {avg['rouge1']:.2f}  ROUGE-2 {avg['rouge2']:.2f}  ROUGE-L {avg['rougeL']:.2f}  "
          f"ROUGE-Lsum {avg['rougeLsum']:.2f}  (mean of per-sample F1 x 100)")
    print(f"  words: prediction {avg['pred_words']:.1f}, reference {avg['ref_words']:.1f}; "
          f"{counts['empty_predictions']} empty predictions; {counts['truncated_inputs']} inputs truncated, "
          f"{counts['chunked_inputs']} chunked (LONG_INPUT={cfg.LONG_INPUT})")
    processes = summary["model"]["processes"]
    print(f"  speed: {timing['samples_per_s']:.2f} samples/s, {timing['tokens_per_s']:.1f} generated tokens/s "
          f"({timing['seconds']:.1f} s, batch {summary['generation']['batch_size']}"
          + (f", {processes} processes" if processes > 1 else "") + f"); precision {loaded.dtype} "
          f"({summary['model']['precision']['reason']})")
    print(f"wrote {plan.paths['predictions.csv']} and {plan.paths['eval.json']}")


def main(argv=None) -> dict:
    from finetuneflow.engine.generation import current_shard
    from finetuneflow.model.backends.hf import precision_for
    cfg = configure(globals(), argv)
    plan = prepare(cfg)
    shard = current_shard(cfg.DEVICE)   # one process, or this one's place under `accelerate launch`
    precision = precision_for(cfg.MODEL, cfg.PRECISION, device_of(cfg, shard), bool(cfg.LOAD_IN_4BIT))
    if shard.main:
        # claim the outputs before the slow part: an interrupted run leaves its own record, never a foreign file
        write_record(plan.paths["run_config.json"].parent,
                     RunRecord(STAGE, extra={"tag": cfg.TAG, "status": "started"}), cfg, plan.inputs,
                     name=plan.paths["run_config.json"].name)
    summary, loaded = evaluate(cfg, plan, shard, precision)
    if summary is None:   # another process of a sharded run: the main process writes and reports
        return {}
    print_summary(cfg, summary, plan, loaded)
    return summary


if __name__ == "__main__":
    run_cli(main)
