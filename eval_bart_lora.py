"""Stage 6 - evaluate one model version on a dialogue split: predictions, ROUGE and speed.

Reads:  MODEL (a base model id/folder, an adapter folder from train_bart_lora.py, or a merged
        folder from merge_bart_lora.py / post_merge_cleanup.py; the kind is detected) and DATASET
Writes: metrics/<TAG>_predictions.csv   id, dialogue, reference, prediction, rouge1, rouge2, rougeL,
                                        rougeLsum, pred_words, ref_words (ROUGE F1 x 100), the truncation
                                        ledger; mbr_choice (DECODING=mbr); reference2.., *_mean (REFERENCE_COLUMNS)
        metrics/<TAG>_eval.json         averages, counts, generation settings, timing, device
        metrics/<TAG>_run_config.json

Run as:
    python eval_bart_lora.py                                   # the adapter in ft_outputs/bart_lora_highlightsum
    python eval_bart_lora.py --model=facebook/bart-large-cnn --tag=baseline
    python eval_bart_lora.py --model=ft_outputs/bart_merged_clean --tag=merged
    python eval_bart_lora.py --model=ft_outputs/gguf/<name>-q4_k_m.gguf --tag=q4   # an exported model
    python eval_bart_lora.py --model=<adapter> --decoding=mbr --mbr_samples=8 --tag=mbr   # consensus decoding
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

Decoding (DECODING): greedy, beam (NUM_BEAMS > 1), or mbr: consensus decoding (minimum Bayes risk):
the greedy summary plus MBR_SAMPLES seeded samples per row (MBR_TEMPERATURE, MBR_TOP_P; the prompt is
encoded once per row), each scored against the others with MBR_UTILITY (rougeL, chrf, minilm cosine);
the one with the highest mean agreement is the summary (ties: the greedy one). MBR_FAITHFUL first
drops candidates with names/numbers/times the dialogue does not contain (all kept when every one
has some). The eval json records the decoding, the candidates dropped, and the cost per row against
the greedy part; the predictions CSV gets the chosen candidate (mbr_choice: 0 = greedy).

Several references (REFERENCE_COLUMNS=summary1,summary2,summary3, as in DialogSum's test files): the
predictions CSV holds them as reference, reference2, reference3; rouge1..rougeLsum are the maximum
over the references and rouge1_mean..rougeLsum_mean the mean over them (named in the eval json too).

Resumable: every process appends each batch it finishes to metrics/<TAG>_predictions.part-<rank>.jsonl
(with the run's identity: the settings, the model's files, the rows). Killed or crashed? Run the same
command again: it continues after the last complete batch, and the CSV is the one an uninterrupted
run writes. The part files go once the CSV is written; a part file of another run (other settings,
model, rows or number of processes) is refused: --OVERWRITE=True discards it.

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
REFERENCE_COLUMNS = []         # [list[str]] several references (e.g. summary1,summary2,summary3): ROUGE max + mean
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
DECODING = None                # [greedy | beam | mbr | None] None: inherit, else beam when NUM_BEAMS > 1, else greedy
MBR_SAMPLES = None             # [int >= 1 | None] mbr: samples besides the greedy summary; None: inherit, else 8
MBR_TEMPERATURE = None         # [float > 0 | None] mbr: sampling temperature; None: inherit, else 0.7
MBR_TOP_P = None               # [0 < float <= 1 | None] mbr: nucleus sampling; None: inherit, else 0.95
MBR_UTILITY = None             # [rougeL | chrf | minilm | None] mbr: candidates' agreement; None: inherit, else rougeL
MBR_FAITHFUL = None            # [bool | None] mbr: drop unfaithful candidates first; None: inherit, else True
MBR_SEED = None                # [int >= 0 | None] mbr: seeds the samples; None: inherit, else SEED
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
OVERWRITE = False              # True: discard the part files (<TAG>_predictions.part-*.jsonl) and start over

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.quality.eval_plan import plan_evaluation


def main(argv=None) -> dict:
    plan = plan_evaluation(configure(globals(), argv))  # model, tag, inherited settings, outputs, rows: none written
    from finetuneflow.quality import eval_run           # torch and the model's libraries load only for a real run
    run = eval_run.begin(plan)                # this process's shard, the precision (checked), the outputs claimed
    loaded = eval_run.load(run)               # the model in that precision, on this process's device
    summary = eval_run.evaluate(run, loaded)  # summaries, scores, predictions CSV, eval json, finished run record
    if summary is None:                       # another process of a sharded run: the main process writes and reports
        return {}
    eval_run.print_summary(run, loaded, summary)
    return summary


if __name__ == "__main__":
    run_cli(main)
