"""Stage 3 - benchmark candidate models zero-shot on the same dialogues and rank them on quality and cost.

Reads:  DATASET (Hub id or local file), the models in MODELS (Hub ids, model folders, .gguf files)
Writes: OUTPUT_DIR/final_ranking.csv, .json, .html   one row per entry, best first (errors included)
        OUTPUT_DIR/rouge.png, tradeoff.png            ROUGE bars; ROUGE-L vs samples/s with the Pareto front
        OUTPUT_DIR/predictions/<model>_predictions.csv  per-sample predictions and ROUGE
        OUTPUT_DIR/run_config.json

Run as:
    python benchmark_models.py                                   # the seed's five candidates + baselines
    python benchmark_models.py --models=ft_outputs/base_smollm2,lead-3 \\
        --dataset=../shared/data/highlightsum_val200.jsonl --split=all --n_samples=50
A single local file is split as training and eval split it (VAL_FRACTION, TEST_FRACTION, SEED);
--split=all scores every row (for a file that is already one split, like highlightsum_val200).
Entries "lead-3" (or lead-k with LEAD_K) and "extractive" are reference baselines that need no
model. A model that fails (gated, out of memory, unknown architecture, bad path) becomes a row
with its error and the run goes on (every entry failing is an error; nothing is written). An
OUTPUT_DIR holding an earlier ranking is replaced only with --OVERWRITE=True (only this stage's own
files: the plan recommend_finetune.py wrote beside it is kept). The composite score and the Pareto
front are defined in finetuneflow/plan/scoring.py; next: `python recommend_finetune.py`.
"""
MODELS = ["facebook/bart-large-cnn", "google/flan-t5-large", "meta-llama/Llama-3.2-1B-Instruct",
          "meta-llama/Llama-3.2-3B-Instruct", "microsoft/Phi-3-mini-4k-instruct",
          "lead-3", "extractive"]      # Hub ids, folders, .gguf files, lead-k, extractive
DATASET = "knkarthick/highlightsum"    # Hub id or local .jsonl/.json/.csv/.parquet file or folder
HUB_CONFIG = None                      # [str | None] Hub dataset configuration name, if it has several
SPLIT = "validation"                   # split to score on (train, validation, test, ...); all: every row, in file order
VAL_FRACTION = 0.1                     # [0 <= float < 1] validation share of a single local file (as training)
TEST_FRACTION = 0.1                    # [0 <= float < 1] test share of a single local file (as training)
DIALOGUE_COLUMN = None                 # [str | None] None: auto-detect
SUMMARY_COLUMN = None                  # [str | None] None: auto-detect
ID_COLUMN = None                       # [str | None] None: auto-detect; row numbers when absent
N_SAMPLES = 200                        # [int >= 0] rows scored per model (0 = all); the seed used the first 200
SHUFFLE = False                        # False: the first N_SAMPLES rows (as the seed); True: a seeded sample
SEED = 42                              # [int >= 0] shuffling seed when SHUFFLE
INSTRUCTION = None                     # [str | None] prompt for causal models; None: prompts.DEFAULT_INSTRUCTION
NUM_BEAMS = None                       # [int >= 1 | None] None = the model's default (BART-cnn 4, causal models 1)
MAX_NEW_TOKENS = 128                   # [int >= 1 | None] generated tokens per summary
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None = the model's default
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None = the model's default (BART-cnn 3)
LENGTH_PENALTY = None                  # [float | None] None = the model's default
BATCH_SIZE = 8                         # [int >= 1] dialogues per generate() call
MAX_INPUT_LENGTH = 1024                # [int >= 16 | None] input tokens, capped at the model's limit; None: the limit
WARMUP_SAMPLES = 2                     # [int >= 0] untimed generations before timing (the shortest dialogues)
LOAD_IN_4BIT = False                   # [bool | None] load models in 4-bit (bitsandbytes) to fit a small GPU
TRUST_REMOTE_CODE = False              # allow models that need their own code from the Hub
ISOLATE = True                         # each model in a fresh process: clean peak memory; a crash cannot stop the run
LEAD_K = 3                             # [int >= 1] turns in a "lead-k" baseline
EXTRACTIVE_K = 3                       # [int >= 1] turns (or sentences) in the "extractive" baseline
REFERENCE_MAX_WORDS = 100              # [int >= 0] cut baseline outputs to this many words (0: no cut)
BERTSCORE_MODEL = "roberta-large"      # BERTScore model (Hub id or local folder); "" = skip BERTScore
QUALITY_WEIGHT = 0.7                   # [float >= 0] composite weight of min-max normalised ROUGE-L
SPEED_WEIGHT = 0.3                     # [float >= 0] composite weight of min-max normalised log10 samples/s
GGUF_IMPORT_DIR = "ft_outputs/imported"  # where .gguf entries are imported as model folders
OUTPUT_DIR = "outputs/benchmarks"      # ranking, charts, predictions (shared with recommend_finetune.py)
OVERWRITE = False                      # replace the earlier ranking in OUTPUT_DIR (this stage's own files only)

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.plan import benchmark
from finetuneflow.plan.ranking_report import console_table


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    settings = benchmark.BenchmarkSettings.from_config(cfg)
    generation = GenerationSettings.from_config(cfg)
    entries = benchmark.parse_entries(settings)
    spec = benchmark.data_spec(cfg, settings)
    folder = benchmark.open_output(cfg.OUTPUT_DIR, entries, spec, settings, cfg.OVERWRITE)
    sample = benchmark.load_sample(spec, settings)
    print(f"{len(sample.dialogues)} dialogues from {sample.source} ({sample.split}; "
          f"{'seeded sample' if settings.shuffle else 'first rows'}); results in {folder.path}")
    result = benchmark.run_benchmark(entries, sample, settings, generation, folder, cfg)
    rows, meta = result["rows"], result["meta"]
    print("\n" + console_table(rows))
    print(f"\n{result['winner']}\nBERTScore: {meta['bertscore']}")
    if result["removed"] or result["kept"]:
        print(f"removed {len(result['removed'])} file(s) of the earlier ranking that this run did not write again"
              + (f"; kept {', '.join(result['kept'])} (edited since)" if result["kept"] else ""))
    print(f"wrote final_ranking.csv, .json, .html, rouge.png, tradeoff.png and "
          f"{sum(bool(r.get('predictions')) for r in rows)} prediction files in {folder.path}")
    return {"rows": rows, "winner": result["winner"], "output_dir": str(folder.path)}


if __name__ == "__main__":
    run_cli(main)
