"""Stage 4 - evaluate one model version on a dialogue split: predictions, ROUGE and speed.

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
Generation settings left at None come from the model folder's run_config.json (what training
used), else from the model's own generation config. Decoding is deterministic, so a different
BATCH_SIZE gives the same predictions. Then compare versions with eval_metrics_bart_lora.py.
"""
MODEL = None                           # base id/folder, adapter folder or merged folder; None: ft_outputs/bart_lora_highlightsum
TAG = None                             # output name: baseline, lora, merged, ...; None: from the model kind
DATASET = "knkarthick/highlightsum"    # Hub id or local .jsonl/.json/.csv/.parquet file or folder
HUB_CONFIG = None                      # Hub dataset configuration name, if it has several
DIALOGUE_COLUMN = None                 # None: auto-detect (dialogue, dialog, text, ...)
SUMMARY_COLUMN = None                  # None: auto-detect (summary, highlights, human_summary, ...)
ID_COLUMN = None                       # None: auto-detect (id, sample_id, fname); row numbers when absent
SPLIT = "validation"                   # split to evaluate (a single local file is split by SEED/fractions)
N_SAMPLES = 200                        # rows evaluated (0 = all)
SHUFFLE = False                        # False: the first N_SAMPLES rows (as the seed did); True: a SEED-shuffled subset
SEED = 42                              # split/shuffle seed; keep it equal to training's for held-out rows
VAL_FRACTION = 0.1                     # share of a single local file used as validation (as in training)
TEST_FRACTION = 0.1                    # share of a single local file used as test (as in training)
NORMALIZE = None                       # rewrite '#Person1#' tags / \r\n like training; None: inherit, else False
NUM_BEAMS = None                       # beams; None: inherit, else the model's config (1 for causal models)
MAX_NEW_TOKENS = None                  # summary token limit; None: inherit, else the model's config (128 causal)
MIN_NEW_TOKENS = None                  # minimum summary tokens; None: inherit, else the model's config
NO_REPEAT_NGRAM_SIZE = None            # forbid repeating n-grams of this size; None: inherit, else model config
LENGTH_PENALTY = None                  # beam length penalty (>1 favours longer); None: inherit, else model config
MAX_INPUT_LENGTH = None                # input tokens per dialogue (longer ones follow LONG_INPUT); None: inherit, else model limit
INSTRUCTION = None                     # prompt for causal models; None: inherit, else prompts.DEFAULT_INSTRUCTION
LONG_INPUT = "truncate"                # dialogues over MAX_INPUT_LENGTH: truncate | chunk (map-reduce windows) | error
BATCH_SIZE = 8                         # dialogues per generate() call (halved automatically on GPU out-of-memory)
LOAD_IN_4BIT = None                    # load the base in 4-bit (QLoRA); None: inherit from training, else False
DEVICE = ""                            # "" = cuda when available, else cpu; or cpu / cuda:0
WANDB = True                           # log to W&B when WANDB_API_KEY or WANDB_MODE=offline is set; False: never
OUTPUT_DIR = "metrics"                 # where the predictions, eval json and run config go

import re
import time

from finetuneflow.contract.settings import configure, inherit, read_run_config, write_run_config
from finetuneflow.contract.data import get_split, load_dialogues, subset
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.contract.paths import FT_OUTPUTS, output_dir, resolve

TRAIN_OUTPUT = f"{FT_OUTPUTS}/bart_lora_highlightsum"
GENERATION_NAMES = ("NUM_BEAMS", "MAX_NEW_TOKENS", "MIN_NEW_TOKENS", "NO_REPEAT_NGRAM_SIZE", "LENGTH_PENALTY")


def upstream_settings(model: str) -> dict | None:
    """The model folder's run_config.json flattened to this script's constant names."""
    folder = resolve(model)
    record = read_run_config(folder) if folder.is_dir() else None
    if not record:
        return None
    flat = {name: (record.get("generation") or {}).get(name.lower()) for name in GENERATION_NAMES}
    dataset = record.get("dataset") if isinstance(record.get("dataset"), dict) else {}
    flat.update(INSTRUCTION=record.get("instruction"), MAX_INPUT_LENGTH=record.get("max_input_length"),
                LOAD_IN_4BIT=record.get("load_in_4bit"),
                NORMALIZE=dataset.get("normalize", (record.get("config") or {}).get("NORMALIZE")))
    return {"config": flat, "kind": "merged" if record.get("merged_from") else None}


def resolve_model_and_tag(cfg) -> dict | None:
    if cfg.MODEL is None:
        default = resolve(TRAIN_OUTPUT)
        if not default.is_dir():
            raise UserError(f"MODEL is not set and {default} does not exist (it is written by `python "
                            f"train_bart_lora.py`); train first, or pass --model=<base id, adapter or merged "
                            f"folder>, e.g. --model=facebook/bart-large-cnn --tag=baseline")
        cfg.MODEL = str(default)
    upstream = upstream_settings(cfg.MODEL)
    if cfg.TAG is None:
        from finetuneflow.model.loading import is_adapter_dir
        cfg.TAG = "lora" if is_adapter_dir(cfg.MODEL) else (upstream or {}).get("kind") or "baseline"
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", cfg.TAG):
        raise UserError(f"--tag={cfg.TAG!r} must be a file-name-safe word (letters, digits, _ . -)")
    return upstream


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    if cfg.LONG_INPUT not in ("truncate", "chunk", "error"):
        raise UserError(f"--long_input={cfg.LONG_INPUT!r} must be truncate, chunk or error")
    upstream = resolve_model_and_tag(cfg)
    inherited = inherit(cfg, upstream, (*GENERATION_NAMES, "INSTRUCTION", "MAX_INPUT_LENGTH", "LOAD_IN_4BIT",
                                        "NORMALIZE"))
    data = load_dialogues(cfg.DATASET, cfg.DIALOGUE_COLUMN, cfg.SUMMARY_COLUMN, cfg.ID_COLUMN, cfg.SEED,
                          cfg.VAL_FRACTION, cfg.TEST_FRACTION, bool(cfg.NORMALIZE), cfg.HUB_CONFIG)
    rows = subset(get_split(data, cfg.SPLIT), cfg.N_SAMPLES, cfg.SEED, shuffle=cfg.SHUFFLE)

    from finetuneflow.quality import tracking
    from finetuneflow.quality.evaluation import evaluate_rows
    from finetuneflow.engine.generation import GenerationSettings
    from finetuneflow.model.loading import load_model
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    started = time.perf_counter()
    loaded = load_model(cfg.MODEL, load_in_4bit=bool(cfg.LOAD_IN_4BIT), device=cfg.DEVICE or None)
    load_seconds = time.perf_counter() - started
    out = output_dir(cfg.OUTPUT_DIR)
    run = tracking.start_run("eval", cfg, out, name=cfg.TAG) if cfg.WANDB else None
    try:
        report = evaluate_rows(loaded, list(rows), GenerationSettings.from_config(cfg), cfg.BATCH_SIZE,
                               cfg.MAX_INPUT_LENGTH, cfg.INSTRUCTION or DEFAULT_INSTRUCTION, cfg.LONG_INPUT,
                               out, cfg.TAG, progress=True)
        record = report.record
        record.update(model={"name": cfg.MODEL, "base": loaded.base, "adapter": loaded.adapter, "family": loaded.family,
                             "kind": "adapter" if loaded.adapter else (upstream or {}).get("kind") or "base",
                             "load_in_4bit": bool(cfg.LOAD_IN_4BIT), "load_seconds": round(load_seconds, 2)},
                      dataset={"source": data.source, "split": cfg.SPLIT, "rows": len(rows), "n_samples": cfg.N_SAMPLES,
                               "shuffle": cfg.SHUFFLE, "seed": cfg.SEED, "columns": data.columns,
                               "dropped_empty_rows": data.dropped},
                      inherited_from_model_folder=inherited)
        atomic_write_json(out / f"{cfg.TAG}_eval.json", record)
        model_path = resolve(cfg.MODEL)
        write_run_config(out, "eval", cfg, [*data.local_files, model_path if model_path.exists() else cfg.MODEL],
                         extra={"tag": cfg.TAG, "generation": record["generation"]}, name=f"{cfg.TAG}_run_config.json")
        tracking.log(run, {**{f"eval/{k}": v for k, v in record["averages"].items()},
                           "eval/samples_per_s": record["timing"]["samples_per_s"],
                           "eval/tokens_per_s": record["timing"]["tokens_per_s"]})
        if run is not None:
            report.log_table(run)
    finally:
        tracking.finish(run)

    avg, counts, timing = record["averages"], record["counts"], record["timing"]
    print(f"model {cfg.MODEL} ({record['model']['kind']}, {loaded.family}) on {loaded.device}; "
          f"{counts['samples']} {cfg.SPLIT} rows of {data.source}")
    if inherited:
        print(f"  inherited from {cfg.MODEL}/run_config.json: {', '.join(inherited)}")
    print(f"  generation: {record['generation']}")
    print(f"  ROUGE-1 {avg['rouge1']:.2f}  ROUGE-2 {avg['rouge2']:.2f}  ROUGE-L {avg['rougeL']:.2f}  "
          f"ROUGE-Lsum {avg['rougeLsum']:.2f}  (mean of per-sample F1 x 100)")
    print(f"  words: prediction {avg['pred_words']:.1f}, reference {avg['ref_words']:.1f}; "
          f"{counts['empty_predictions']} empty predictions; {counts['truncated_inputs']} inputs truncated, "
          f"{counts['chunked_inputs']} chunked (LONG_INPUT={cfg.LONG_INPUT})")
    print(f"  speed: {timing['samples_per_s']:.2f} samples/s, {timing['tokens_per_s']:.1f} generated tokens/s "
          f"({timing['seconds']:.1f} s, batch {record['generation']['batch_size']})")
    print(f"wrote {report.predictions_path} and {out / f'{cfg.TAG}_eval.json'}")
    return record


if __name__ == "__main__":
    run_cli(main)
