"""Benchmark candidate models zero-shot on the same dialogues and rank them on quality and cost.

Reads:  DATASET (Hub id or local file), the models in MODELS (Hub ids, model folders, .gguf files)
Writes: OUTPUT_DIR/final_ranking.csv, .json, .html   one row per entry, best first (errors included)
        OUTPUT_DIR/rouge.png, tradeoff.png            ROUGE bars; ROUGE-L vs samples/s with the Pareto front
        OUTPUT_DIR/predictions/<model>_predictions.csv  per-sample predictions and ROUGE
        OUTPUT_DIR/run_config.json

Run as:
    python benchmark_models.py                                   # the seed's five candidates + baselines
    python benchmark_models.py --models=ft_outputs/base_smollm2,lead-3 --dataset=../shared/data/highlightsum_val200.jsonl \\
        --split=all --n_samples=50
A single local file is split as training and eval split it (VAL_FRACTION, TEST_FRACTION, SEED);
--split=all scores every row (for a file that is already one split, like highlightsum_val200).
Entries "lead-3" (or lead-k with LEAD_K) and "extractive" are reference baselines that need no
model. A model that fails (gated, out of memory, unknown architecture, bad path) becomes a row
with its error and the run goes on. The composite score and the Pareto front are defined in
finetuneflow/ranking.py; next: `python recommend_finetune.py`.
"""
MODELS = ["facebook/bart-large-cnn", "google/flan-t5-large", "meta-llama/Llama-3.2-1B-Instruct",
          "meta-llama/Llama-3.2-3B-Instruct", "microsoft/Phi-3-mini-4k-instruct",
          "lead-3", "extractive"]      # Hub ids, folders, .gguf files, lead-k, extractive
DATASET = "knkarthick/highlightsum"    # Hub id or local .jsonl/.json/.csv/.parquet file or folder
HUB_CONFIG = None                      # [str | None] Hub dataset configuration name, if it has several
SPLIT = "validation"                   # split to score on; "all" = every row (e.g. a file that is one split already)
VAL_FRACTION = 0.1                     # [0 <= float < 1] share of a single local file used as validation (as in training and eval)
TEST_FRACTION = 0.1                    # [0 <= float < 1] share of a single local file used as test (as in training and eval)
DIALOGUE_COLUMN = None                 # [str | None] None: auto-detect
SUMMARY_COLUMN = None                  # [str | None] None: auto-detect
ID_COLUMN = None                       # [str | None] None: auto-detect; row numbers when absent
N_SAMPLES = 200                        # [int >= 0] rows scored per model (0 = all); the seed used the first 200
SHUFFLE = False                        # False: the first N_SAMPLES rows (as the seed); True: a seeded sample
SEED = 42                              # [int >= 0] shuffling seed when SHUFFLE
INSTRUCTION = None                     # [str | None] prompt for causal models; None = finetuneflow.model.prompts.DEFAULT_INSTRUCTION
NUM_BEAMS = None                       # [int >= 1 | None] None = the model's default (BART-cnn 4, causal models 1)
MAX_NEW_TOKENS = 128                   # [int >= 1 | None] generated tokens per summary
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None = the model's default
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None = the model's default (BART-cnn 3)
LENGTH_PENALTY = None                  # [float | None] None = the model's default
BATCH_SIZE = 8                         # [int >= 1] dialogues per generate() call
MAX_INPUT_LENGTH = 1024                # [int >= 16] input tokens (longer dialogues are cut); None = the model's limit
WARMUP_SAMPLES = 2                     # [int >= 0] untimed generations before timing (the shortest dialogues)
LOAD_IN_4BIT = False                   # [bool | None] load models in 4-bit (bitsandbytes) to fit a small GPU
TRUST_REMOTE_CODE = False              # allow models that need their own code from the Hub
ISOLATE = True                         # each model in a fresh process: clean peak memory; a crash cannot stop the run
LEAD_K = 3                             # [int >= 1] turns in a "lead-k" baseline
EXTRACTIVE_K = 3                       # [int >= 1] turns (or sentences) in the "extractive" baseline
REFERENCE_MAX_WORDS = 100              # [int >= 0] cut baseline outputs to this many words, as models are cut (0 = no cut)
BERTSCORE_MODEL = "roberta-large"      # BERTScore model (Hub id or local folder); "" = skip BERTScore
QUALITY_WEIGHT = 0.7                   # [float >= 0] composite weight of min-max normalised ROUGE-L
SPEED_WEIGHT = 0.3                     # [float >= 0] composite weight of min-max normalised log10 samples/s
GGUF_IMPORT_DIR = "ft_outputs/imported"  # where .gguf entries are imported as model folders
OUTPUT_DIR = "outputs/benchmarks"      # ranking, charts, predictions

import os
import time
from dataclasses import asdict
from pathlib import Path

from datasets import concatenate_datasets

from finetuneflow.plan import ranking
from finetuneflow.contract.record import RunRecord, write_record
from finetuneflow.contract.settings import configure
from finetuneflow.contract.data import get_split, load_dialogues, subset
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.engine.generation import GenerationSettings
from finetuneflow.contract.paths import output_dir
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    if not cfg.MODELS:
        raise UserError("MODELS is empty: list Hub ids, model folders, .gguf files, lead-3 or extractive, "
                        "e.g. --MODELS=facebook/bart-large-cnn,lead-3")
    every = cfg.SPLIT.lower() == "all"   # the same split rules as training and eval, unless "all"
    data = load_dialogues(cfg.DATASET, cfg.DIALOGUE_COLUMN, cfg.SUMMARY_COLUMN, cfg.ID_COLUMN, cfg.SEED,
                          0.0 if every else cfg.VAL_FRACTION, 0.0 if every else cfg.TEST_FRACTION, False, cfg.HUB_CONFIG)
    chosen = concatenate_datasets(list(data.splits.values())) if every else get_split(data, cfg.SPLIT)
    rows_ds = subset(chosen, cfg.N_SAMPLES, cfg.SEED, shuffle=cfg.SHUFFLE)
    ids, dialogues, refs = list(rows_ds["id"]), list(rows_ds["dialogue"]), list(rows_ds["summary"])
    split_used = "all rows" if every else cfg.SPLIT + (" (made from a single file)" if data.made_splits else "")
    print(f"{len(dialogues)} dialogues from {cfg.DATASET} ({split_used}; "
          f"{'seeded sample' if cfg.SHUFFLE else 'first rows'})")
    out = output_dir(cfg.OUTPUT_DIR)
    pred_dir = output_dir(out / "predictions")
    gen = GenerationSettings.from_config(cfg)
    instruction = cfg.INSTRUCTION or DEFAULT_INSTRUCTION
    rows, taken, local_inputs = [], set(), []
    for entry in cfg.MODELS:
        row = {"model": ranking.label_for(entry, taken), "entry": entry, "status": "ok", "n_samples": len(dialogues)}
        rows.append(row)
        reference = ranking.parse_reference(entry, cfg.LEAD_K, cfg.EXTRACTIVE_K)
        print(f"[{len(rows)}/{len(cfg.MODELS)}] {entry}")
        try:
            if reference:
                start = time.perf_counter()
                predictions = ranking.reference_summaries(*reference, dialogues, cfg.REFERENCE_MAX_WORDS)
                seconds = time.perf_counter() - start
                row.update(kind="reference", source=f"{reference[0]} baseline, k={reference[1]}", device="cpu",
                           seconds=round(seconds, 4), samples_per_s=round(len(dialogues) / max(seconds, 1e-9), 1))
            else:
                row.update(kind="model", source=ranking.model_source(entry, cfg.GGUF_IMPORT_DIR))
                if os.path.exists(row["source"]):
                    local_inputs.append(row["source"])
                args = (row["source"], dialogues, asdict(gen), cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, instruction,
                        cfg.WARMUP_SAMPLES, cfg.LOAD_IN_4BIT, cfg.TRUST_REMOTE_CODE)
                result = ranking.run_isolated(*args) if cfg.ISOLATE else ranking.measure_model(*args)
                predictions = result.pop("summaries")
                row["settings"] = result.pop("settings")
                row.update(result, samples_per_s=round(len(dialogues) / result["seconds"], 4),
                           tokens_per_s=round(result["generated_tokens"] / result["seconds"], 2),
                           seconds=round(result["seconds"], 3), load_seconds=round(result["load_seconds"], 2))
            ranking.score_predictions(row, ids, dialogues, refs, predictions, pred_dir, cfg.BERTSCORE_MODEL)
            print(f"    ROUGE-L {row['rougeL']:.2f}, {row['samples_per_s']:.3g} samples/s"
                  + (f", peak {row['peak_memory_mb']:.0f} MB ({row['memory_kind']})" if row["kind"] == "model" else ""))
        except KeyboardInterrupt:
            raise
        except Exception as exc:   # one broken model must not stop the benchmark: record why and go on
            row.update(status="error", error=ranking.first_line(exc))
            row.setdefault("kind", "model")
            print(f"    failed: {row['error']}")
    produced = {Path(r["predictions"]).name for r in rows if r.get("predictions")}
    stale = [f for f in pred_dir.glob("*_predictions.csv") if f.name not in produced]
    for f in stale:   # an earlier run's models would otherwise look like this run's
        f.unlink()
    if stale:
        print(f"removed {len(stale)} prediction file(s) of models not in this run from {pred_dir}")
    ranking.add_composite(rows, cfg.QUALITY_WEIGHT, cfg.SPEED_WEIGHT)
    rows = ranking.order_rows(rows)
    winner = ranking.explain_winner(rows, cfg.QUALITY_WEIGHT, cfg.SPEED_WEIGHT)
    notes = sorted({r["bertscore_note"] for r in rows if r.get("bertscore_note")})
    meta = {"dataset": cfg.DATASET, "split": split_used, "n_samples": len(dialogues),
            "generation": {**gen.overrides(), "batch_size": cfg.BATCH_SIZE, "max_input_length": cfg.MAX_INPUT_LENGTH},
            "composite_formula": ranking.formula_text(cfg.QUALITY_WEIGHT, cfg.SPEED_WEIGHT),
            "bertscore": "; ".join(notes) or "no successful rows", "winner": winner,
            "failed": sum(r["status"] == "error" for r in rows)}
    files = ranking.write_tables(rows, out, meta)
    charts = [out / "rouge.png", out / "tradeoff.png"]
    ranking.rouge_chart(rows, charts[0])
    ranking.tradeoff_chart(rows, charts[1])
    ranking.write_html(rows, out / "final_ranking.html", charts, meta, winner)
    record = RunRecord("benchmark_models", instruction=instruction, extra={
        "dataset": cfg.DATASET, "data_split": split_used, "n_samples": len(dialogues),
        "winner": rows[0]["model"] if ranking.is_candidate(rows[0]) else None,
        "composite_formula": meta["composite_formula"], "bertscore": meta["bertscore"]})
    write_record(out, record, cfg, data.local_files + local_inputs)
    print(f"\n{'model':<28}{'ROUGE-L':>9}{'samples/s':>11}{'composite':>11}  status")
    for r in rows:
        composite = f"{r['composite']:.3f}" if r.get("composite") is not None else "-"
        score = f"{r['rougeL']:.2f}" if r.get("rougeL") is not None else "-"
        speed = f"{r['samples_per_s']:.3g}" if r.get("samples_per_s") else "-"
        print(f"{r['model'][:27]:<28}{score:>9}{speed:>11}{composite:>11}  "
              + (r["kind"] if r["status"] == "ok" else f"error: {r['error'][:80]}"))
    print(f"\n{winner}\nBERTScore: {meta['bertscore']}")
    print(f"wrote {files['csv']}, {files['json'].name}, final_ranking.html, rouge.png, tradeoff.png and "
          f"{sum(r['status'] == 'ok' for r in rows)} prediction files in {pred_dir}")
    if meta["failed"] == len(rows):
        raise UserError(f"every entry of MODELS failed (errors in {files['csv']}); fix them or add lead-3")
    return {"rows": rows, "winner": winner, "output_dir": str(out)}


if __name__ == "__main__":
    run_cli(main)
