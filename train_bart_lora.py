"""Stage 5 - fine-tune a summarizer with LoRA or QLoRA, keeping the checkpoint with the best validation ROUGE-L.

Works for seq2seq models (BART, T5) and decoder-only models (Llama, Phi-3, Qwen, SmolLM, ...): the
family comes from the model's config. Causal models learn "prompt -> summary + EOS" with the loss on
the summary only, through the same prompt the generation engine uses later. Every evaluation
reports the validation loss (every validation row) AND the ROUGE and unsupported-mention rate of
summaries generated with NUM_BEAMS ... LENGTH_PENALTY below (recorded in run_config.json, so later
stages generate the same way) for a fixed, length-stratified subset of the validation rows
(EVAL_GENERATE_SAMPLES), on a time budget (EVAL_BUDGET_SECONDS), and logs what each part cost.

DECODING and the MBR_* settings are recorded for the later stages (evaluation, inference, the
server, the deploy gate inherit them, so a recipe file can ship its decoding: recipes/*.yaml);
in-training evaluations decode DECODING=mbr's greedy part (MBR costs 1 + MBR_SAMPLES generations).
Family defaults (NUM_BEAMS, MAX_NEW_TOKENS, EVAL_GENERATE_SAMPLES left at None):
  seq2seq (BART, T5): the seed's 4 beams, 192 new tokens, every validation row;
  causal (Llama, SmolLM, ...): greedy, 1.25 x the 95th percentile of the training summaries' tokens
  (rounded up to 8, at most MAX_TARGET_LENGTH), 24 rows. The resolved values and their source are
  printed and recorded (run_config.json "generation" / "generation_sources").
Time budget: the first evaluation stops starting batches once the next would end past
EVAL_BUDGET_SECONDS; the rows it finished are the rows of every later evaluation (same rows for
every checkpoint); the log line says when a later one runs over.
Checkpoint selection (SELECT_ON): rougeL = highest validation ROUGE-L. rougeL_faithful = highest
ROUGE-L among the checkpoints whose unsupported-mention rate is at most the lowest rate seen so far
+ FAITHFULNESS_MARGIN, decided again after every evaluation (finetuneflow/train/selection.py);
on dialogues longer than the check was validated for, it falls back to rougeL and says so.
Preference tuning (OBJECTIVE=dpo|orpo, through TRL's DPOTrainer / ORPOTrainer): continues START_ADAPTER
(a finished adapter of MODEL) on pairs whose chosen summary is the reference and whose rejected one is a
corruption of it by the faithfulness validation's code (finetuneflow/quality/corruptions.py): NEGATIVES =
name (a name from another dialogue), number (a changed number or time), speaker (swapped speakers),
sentence (a sentence from another dialogue); PAIRS_PER_ROW of the kinds that apply to a row are drawn
with SEED (a kind that cannot apply is skipped for that row and counted). DPO's reference is the start
adapter itself (a frozen copy). INSTRUCTION and decoding settings left at None come from the start
adapter's record. Evaluations, selection, resume and the outputs are those of sft; run_config.json and
train_metrics.json add "preference" (objective, beta, start adapter, pairs of each kind). DPO trains
decoder-only models only (TRL); ORPO trains both families. A batch of BATCH_SIZE pairs runs 2 x BATCH_SIZE
sequences (DPO: plus the reference's forward): halve BATCH_SIZE and double GRAD_ACCUM to keep sft's memory.
Seeds: SEED seeds the training (order, LoRA init, dropout, negatives); SPLIT_SEED (None: SEED) the data
split and row subsets, so several SEEDs with one SPLIT_SEED keep the same train/validation/test rows.
In-training generation runs in fp32 (autocast off, as the evaluation stage) unless EVAL_PRECISION=autocast.
Precision (PRECISION): autocast only, LoRA weights and AdamW stay fp32. auto = bf16 on a GPU that
has it (else fp16); on a CPU, bf16 only with native bf16 (avx512_bf16/AMX) for causal models of
>= 50M parameters (measured as good as fp32 on SmolLM2; see BENCHMARKS.md, Training), else fp32.

Reads:  DATASET (Hub id or local file/folder), MODEL (Hub id or local folder)
Writes: OUTPUT_DIR/ exactly these files when the run finishes:
          adapter_config.json, adapter_model.safetensors   the LoRA adapter (best validation ROUGE-L)
          tokenizer.json, tokenizer_config.json, ...       the tokenizer (chat_template.jinja if it has one)
          train_metrics.json   loss curve, ROUGE of every evaluation, best step, samples/s, tokens/s, memory
          loss_curve.png       training/validation loss and validation ROUGE-L per step
          run_config.json      settings + what later stages inherit (base_model, family, instruction,
                               prompt_style, lengths, lora, generation, dataset); written last = finished
        OUTPUT_DIR/checkpoints/ while training (run_config.json of the unfinished run + checkpoint-N/,
          the newest SAVE_TOTAL_LIMIT plus the best); removed at the end unless KEEP_CHECKPOINTS=True.
        CACHE_DIR/ tokenized splits, reused by any later run with the same tokenizer, prompt, lengths and rows.

Interrupted? Run the same command again: RESUME=auto continues from the newest complete checkpoint
(a kill at any moment leaves one) and ends with the same adapter as an uninterrupted run (same data
order, same dropout). Changed a setting? That is an error unless --OVERWRITE=True, except for an
unfinished run with no complete checkpoint, or one stopped by a non-finite loss: it is replaced
(one line says so). OVERWRITE removes only this stage's files; a folder with other files is refused.
Re-running a finished run with the same settings does nothing and prints its result.
A NaN/inf loss or gradient stops training with one `error:` line naming the step (exit 2).

Run as:
    python train_bart_lora.py                                   # the seed recipe: BART-large-CNN on HighlightSum
    python train_bart_lora.py --model_name=ft_outputs/base_smollm2 --dataset=../shared/data/dialogsum_dev500.jsonl \\
        --train_samples=400 --epochs=1 --max_input_length=512 --num_beams=1 --output_dir=ft_outputs/smollm2_lora
    python train_bart_lora.py --load_in_4bit=True ...           # QLoRA
    python train_bart_lora.py --model_name=ft_outputs/base_smollm2 --dataset=../shared/data/dialogsum_dev500.jsonl \\
        --objective=dpo --start_adapter=ft_outputs/smollm2_lora --output_dir=ft_outputs/smollm2_dpo ...  # DPO on SFT
    accelerate launch --num_processes 2 train_bart_lora.py ...  # DDP on 2 GPUs (FSDP/DeepSpeed: `accelerate config`)
    accelerate launch --multi_gpu --num_processes 2 train_bart_lora.py ...  # no GPU: 2 CPU processes, DDP over gloo
      (accelerate's `--cpu --num_processes 2` starts only ONE process unless MPI is set up)
Tracking (REPORT_TO, the Trainer's integrations, the same metrics in each): auto = W&B online with
WANDB_API_KEY, offline with WANDB_MODE=offline (files in ./wandb), off otherwise; tensorboard
(TRACKING_DIR/tensorboard/), mlflow (a file store in TRACKING_DIR/mlflow, or $MLFLOW_TRACKING_URI).
"""
MODEL = "facebook/bart-large-cnn"       # Hub id or local folder; seq2seq (BART/T5) or causal (Llama, Qwen, ...)
DATASET = "knkarthick/highlightsum"  # Hub id or local .jsonl/.json/.csv/.parquet file or folder
HUB_CONFIG = None                      # [str | None] Hub dataset configuration name, if it has several
DIALOGUE_COLUMN = None                 # [str | None] None: auto-detect (dialogue, dialog, text, ...)
SUMMARY_COLUMN = None                  # [str | None] None: auto-detect (summary, highlights, target, ...)
ID_COLUMN = None                       # [str | None] None: auto-detect (id, sample_id, fname); row numbers when absent
VAL_FRACTION = 0.1                     # [0 <= float < 1] share of a single local file kept for validation
TEST_FRACTION = 0.1                    # [0 <= float < 1] share of a single local file kept for test (never trained on)
NORMALIZE = False                      # [bool | None] rewrite '#Person1#' tags and \r\n (use the same for inference)
TRAIN_SAMPLES = 2000                   # [int >= 0] training rows after a seeded shuffle (0 = all)
VAL_SAMPLES = 200                      # [int >= 0] validation rows for eval loss and generated ROUGE (0 = all)
EPOCHS = 3                             # [float > 0] passes over the training rows
BATCH_SIZE = 4                         # [int >= 1] micro-batch per device
GRAD_ACCUM = 2                         # [int >= 1] micro-batches per optimizer step
LEARNING_RATE = 2e-4                   # [0 < float < 1] peak learning rate (linear decay)
MAX_INPUT_LENGTH = 768                 # [int >= 16] input tokens (causal: the whole prompt); dialogues are cut to fit
MAX_TARGET_LENGTH = 192                # [int >= 2] tokens of summary (causal: including EOS)
LORA_R = 8                             # [int >= 1] LoRA rank
LORA_ALPHA = 32                        # [int >= 1] LoRA scaling numerator
LORA_DROPOUT = 0.05                    # [0 <= float < 1] dropout on the LoRA path
TARGET_MODULES = None                  # [all-linear | list[str] | None] None: the architecture default (BART: q,v)
LOAD_IN_4BIT = False                   # [bool | None] QLoRA: nf4 4-bit base with double quantization (bitsandbytes)
ALLOW_CPU_FALLBACK = False    # when 4-bit is unavailable here, train the full-precision model instead of failing
GRADIENT_CHECKPOINTING = False  # trade compute for memory (long inputs, small GPUs)
INSTRUCTION = None                     # [str | None] causal prompt instruction; None: START_ADAPTER's or the default
OBJECTIVE = "sft"                      # [sft | dpo | orpo] sft: learn the references; dpo/orpo: tune START_ADAPTER
START_ADAPTER = None                   # [str | None] dpo/orpo: the finished adapter folder to continue (base: MODEL)
PREFERENCE_BETA = None                 # [float > 0 | None] dpo/orpo: TRL's beta; None: TRL's default (0.1)
NEGATIVES = "name,number,speaker,sentence"  # [list[name | number | speaker | sentence]] dpo/orpo: corruption kinds
PAIRS_PER_ROW = 1                      # [int >= 0] dpo/orpo: rejected summaries per row (0 = every kind that applies)
NUM_BEAMS = None                       # [int >= 1 | None] eval beams (recorded); None: family default (see above)
MAX_NEW_TOKENS = None                  # [int >= 1 | None] summary tokens; None: family default (seq2seq 192)
MIN_NEW_TOKENS = None                  # [int >= 0 | None] shortest generated summary, tokens (None: model default)
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: model default (bart-large-cnn: 3)
LENGTH_PENALTY = 1.0                   # [float | None] beam-search length penalty (None: model default)
DECODING = None                        # [greedy | beam | mbr | None] recorded for eval/serving; training evals: greedy
MBR_SAMPLES = None                     # [int >= 1 | None] DECODING=mbr (recorded): samples besides the greedy one (8)
MBR_TEMPERATURE = None                 # [float > 0 | None] DECODING=mbr (recorded): sampling temperature (0.7)
MBR_TOP_P = None                       # [0 < float <= 1 | None] DECODING=mbr (recorded): nucleus sampling (0.95)
MBR_UTILITY = None                     # [rougeL | chrf | minilm | None] DECODING=mbr (recorded): agreement (rougeL)
MBR_FAITHFUL = None                    # [bool | None] DECODING=mbr (recorded): drop unfaithful candidates (True)
MBR_SEED = None                        # [int >= 0 | None] DECODING=mbr (recorded): None = SEED
EVAL_STEPS = 0                         # [int >= 0] evaluate and checkpoint every N optimizer steps; 0 = once per epoch
EVAL_ON_START = True          # evaluate before training too: the zero-shot ROUGE baseline
EVAL_BATCH_SIZE = 8                    # [int >= 1] batch size for validation loss and generation
EVAL_GENERATE_SAMPLES = None           # [int >= 0 | None] stratified rows per eval (0 = all); None: family default
EVAL_BUDGET_SECONDS = 120              # [float >= 0] generation seconds per evaluation (0 = no limit)
EVAL_PRECISION = "fp32"                # [fp32 | autocast] in-training generation: fp32 (as eval) or under the autocast
SELECT_ON = "rougeL"                   # [rougeL | rougeL_faithful] how the best checkpoint is chosen
FAITHFULNESS_MARGIN = 0.05             # [0 <= float <= 1] rougeL_faithful: rate allowed above the lowest
EARLY_STOPPING_PATIENCE = 0            # [int >= 0] stop after N evaluations without a better ROUGE-L (0 = off)
MAX_STEPS = 0                          # [int >= 0] cap on optimizer steps (0 = EPOCHS decides)
LOGGING_STEPS = 10                     # [int >= 1] log the training loss every N steps
SAVE_TOTAL_LIMIT = 2                   # [int >= 0] newest checkpoints kept while training, plus the best (0 = all)
SEED = 42                              # [int >= 0] seeds the training: data order, LoRA init, dropout, negatives
SPLIT_SEED = None                      # [int >= 0 | None] seeds the data split and row subsets; None: SEED
RESUME = "auto"                        # [auto | never | str] auto: newest complete checkpoint; never; checkpoint-N
OVERWRITE = False             # replace an OUTPUT_DIR that holds a run with other settings
KEEP_CHECKPOINTS = False      # keep OUTPUT_DIR/checkpoints after a finished run
CACHE_DIR = ".cache/tokenized"  # tokenized-split cache ("" = off)
OUTPUT_DIR = "ft_outputs/bart_lora_highlightsum"  # the adapter folder later stages read
PRECISION = "auto"                     # [auto | fp32 | bf16 | fp16] autocast precision (fp32 weights); auto: see above
REPORT_TO = "auto"                     # [auto | none | list[wandb | tensorboard | mlflow]] trackers
TRACKING_DIR = "runs"                  # tensorboard event files and the MLflow file store go below this folder

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.train import preflight
from finetuneflow.train.settings import RENAMED, TrainSettings


def main(argv=None) -> dict:
    settings = TrainSettings.from_config(configure(globals(), argv, renamed=RENAMED))
    job = preflight.plan_job(settings)     # checks, start adapter, data, splits, start/resume/skip: nothing written
    if job.plan.finished:
        return preflight.already_finished(job)
    from finetuneflow.quality import tracking   # the heavy libraries load only for a run that will train
    from finetuneflow.train import steps
    from finetuneflow.train.lora import load_base
    steps.begin(job)                       # process state (one per device under accelerate) and seed
    base = load_base(job.settings, job.state.device)   # config, lengths, 4-bit, weights, LoRA targets
    steps.decide(job, base)                # precision and family decoding defaults (checked, nothing written)
    tokenized = steps.tokenize(job, base)  # rows or preference pairs; impossible lengths fail here
    steps.plan_evaluations(job, base, tokenized)   # the fixed evaluation subset, the selection rule
    steps.start(job)                       # the run folder is prepared only now
    model = steps.make_model(job, base)    # a new LoRA adapter (sft), or START_ADAPTER (dpo/orpo)
    run, active = steps.start_tracking(job)
    try:
        trainer = steps.build_trainer(job, base, model, tokenized, active)
        steps.run_training(job, trainer)
        return steps.finish(job, base, trainer, tokenized, run)
    finally:
        tracking.finish(run)


if __name__ == "__main__":
    run_cli(main)
