"""Stage 5 - fine-tune a summarizer with LoRA or QLoRA, keeping the checkpoint with the best validation ROUGE-L.

Works for seq2seq models (BART, T5) and decoder-only models (Llama, Phi-3, Qwen, SmolLM, ...): the
family comes from the model's config. Causal models learn "prompt -> summary + EOS" with the loss on
the summary only, through the same prompt the generation engine uses later. Every evaluation
reports the validation loss AND the ROUGE of summaries generated with NUM_BEAMS ... LENGTH_PENALTY
below (recorded in run_config.json, so later stages generate the same way).

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
(a kill at any moment leaves one). Changed a setting? That is an error unless --OVERWRITE=True.
Re-running a finished run with the same settings does nothing and prints its result.

Run as:
    python train_bart_lora.py                                   # the seed recipe: BART-large-CNN on HighlightSum
    python train_bart_lora.py --model_name=ft_outputs/base_smollm2 --dataset=../shared/data/dialogsum_dev500.jsonl \\
        --train_samples=400 --epochs=1 --max_input_length=512 --num_beams=1 --output_dir=ft_outputs/smollm2_lora
    python train_bart_lora.py --load_in_4bit=True ...           # QLoRA
    accelerate launch --num_processes 2 train_bart_lora.py ...  # DDP on 2 GPUs (FSDP/DeepSpeed: `accelerate config`)
    accelerate launch --multi_gpu --num_processes 2 train_bart_lora.py ...  # no GPU: 2 CPU processes, DDP over gloo
      (accelerate's `--cpu --num_processes 2` starts only ONE process unless MPI is set up)
Tracking: W&B online with WANDB_API_KEY, offline with WANDB_MODE=offline (files in ./wandb), off otherwise.
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
MAX_INPUT_LENGTH = 768                 # [int >= 16] tokens of model input (causal: the whole prompt); dialogues are cut to fit
MAX_TARGET_LENGTH = 192                # [int >= 2] tokens of summary (causal: including EOS)
LORA_R = 8                             # [int >= 1] LoRA rank
LORA_ALPHA = 32                        # [int >= 1] LoRA scaling numerator
LORA_DROPOUT = 0.05                    # [0 <= float < 1] dropout on the LoRA path
TARGET_MODULES = None                  # [all-linear | list[str] | None] None: auto (BART q_proj,v_proj; T5 q,v; Llama-style q/k/v/o_proj), "all-linear", names
LOAD_IN_4BIT = False                   # [bool | None] QLoRA: nf4 4-bit base with double quantization (bitsandbytes)
ALLOW_CPU_FALLBACK = False    # when 4-bit is unavailable here, train the full-precision model instead of failing
GRADIENT_CHECKPOINTING = False  # trade compute for memory (long inputs, small GPUs)
INSTRUCTION = None                     # [str | None] causal prompt instruction; None: finetuneflow.model.prompts.DEFAULT_INSTRUCTION
NUM_BEAMS = 4                          # [int >= 1 | None] generation for eval ROUGE, recorded for later stages (None: model default)
MAX_NEW_TOKENS = 192                   # [int >= 1 | None] longest generated summary, tokens
MIN_NEW_TOKENS = None                  # [int >= 0 | None] shortest generated summary, tokens (None: model default)
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: model default (bart-large-cnn: 3); causal models would count the prompt too
LENGTH_PENALTY = 1.0                   # [float | None] beam-search length penalty (None: model default)
EVAL_STEPS = 0                         # [int >= 0] evaluate and checkpoint every N optimizer steps; 0 = once per epoch
EVAL_ON_START = True          # evaluate before training too: the zero-shot ROUGE baseline
EVAL_BATCH_SIZE = 8                    # [int >= 1] batch size for validation loss and generation
EARLY_STOPPING_PATIENCE = 0            # [int >= 0] stop after N evaluations without a better ROUGE-L (0 = off)
MAX_STEPS = 0                          # [int >= 0] cap on optimizer steps (0 = EPOCHS decides)
LOGGING_STEPS = 10                     # [int >= 1] log the training loss every N steps
SAVE_TOTAL_LIMIT = 2                   # [int >= 0] newest checkpoints kept while training, plus the best (0 = all)
SEED = 42                              # [int >= 0] seeds data order, subsets, LoRA init
RESUME = "auto"                        # [auto | never | str] auto: continue from the newest complete checkpoint; never; or checkpoint-N
OVERWRITE = False             # replace an OUTPUT_DIR that holds a run with other settings
KEEP_CHECKPOINTS = False      # keep OUTPUT_DIR/checkpoints after a finished run
CACHE_DIR = ".cache/tokenized"  # tokenized-split cache ("" = off)
OUTPUT_DIR = "ft_outputs/bart_lora_highlightsum"  # the adapter folder later stages read

import json

from transformers import set_seed

from finetuneflow.contract.data import DataSpec, load_data, training_splits
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.paths import ROOT, resolve
from finetuneflow.contract.record import Lineage, RunRecord, Split, fingerprint, ids_digest, portable
from finetuneflow.contract.safety import check_location
from finetuneflow.contract.settings import configure
from finetuneflow.model.family import SEQ2SEQ, family_of
from finetuneflow.model.loading import load_config, local_or_hub
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, prompt_style, seq2seq_prefix
from finetuneflow.quality import tracking
from finetuneflow.train import training


def run_record(cfg, loaded, family, targets, in_4bit, instruction, data, train_rows, val_rows) -> RunRecord:
    """What later stages inherit from the adapter folder."""
    split = Split(source=portable(data.source), hub_config=cfg.HUB_CONFIG, columns=data.columns,
                  normalize=cfg.NORMALIZE, seed=cfg.SEED, val_fraction=cfg.VAL_FRACTION,
                  test_fraction=cfg.TEST_FRACTION, made_from_single_file=data.made_splits,
                  train_samples=cfg.TRAIN_SAMPLES, val_samples=cfg.VAL_SAMPLES, train_rows=len(train_rows),
                  validation_rows=len(val_rows), dropped_empty_rows=data.dropped,
                  train_fingerprints=[fingerprint(d) for d in train_rows["dialogue"]],
                  validation_ids=ids_digest(val_rows["id"]))
    return RunRecord(
        training.STAGE, family=family, instruction=instruction,
        prompt_style="seq2seq" if family == SEQ2SEQ else prompt_style(loaded.tokenizer),
        seq2seq_prefix=seq2seq_prefix(loaded.model.config) if family == SEQ2SEQ else None,
        max_input_length=cfg.MAX_INPUT_LENGTH, max_target_length=cfg.MAX_TARGET_LENGTH, load_in_4bit=in_4bit,
        backend="transformers", generation=GenerationSettings.from_config(cfg),
        lineage=Lineage(base_model=portable(local_or_hub(cfg.MODEL)), adapter=portable(resolve(cfg.OUTPUT_DIR))),
        split=split, extra={"lora": {"r": cfg.LORA_R, "alpha": cfg.LORA_ALPHA, "dropout": cfg.LORA_DROPOUT,
                                     "target_modules": targets}})


def main(argv=None) -> dict:
    cfg = configure(globals(), argv, renamed=training.RENAMED)
    state = training.process_state()   # one process, or one per device under `accelerate launch`
    say = print if state.is_main_process else (lambda *args, **kwargs: None)
    set_seed(cfg.SEED)
    data = load_data(DataSpec.from_config(cfg))
    train_rows, val_rows, note = training_splits(data, cfg.TRAIN_SAMPLES, cfg.VAL_SAMPLES, cfg.SEED, cfg.VAL_FRACTION)
    out = resolve(cfg.OUTPUT_DIR).resolve()
    check_location(out, "OUTPUT_DIR", [*data.local_files, cfg.MODEL])
    plan = training.plan_run(out, cfg, data.local_files, str(cfg.RESUME), cfg.OVERWRITE)
    if plan.finished:
        if state.is_main_process:
            training.prepare_run_dir(plan, cfg, data.local_files, cfg.KEEP_CHECKPOINTS)
        found = out / "train_metrics.json"
        metrics = json.loads(found.read_text(encoding="utf-8")) if found.is_file() else {}
        say(f"{out} already holds a finished run with these settings (best ROUGE-L {metrics.get('best_rougeL')} "
            f"at step {metrics.get('best_step')}); nothing to do. Pass --OVERWRITE=True to train again.")
        return {"output_dir": str(out), "already_finished": True, **metrics}
    model_config = load_config(cfg.MODEL)
    family = family_of(model_config)
    training.check_lengths(model_config, family, cfg.MODEL, cfg.MAX_INPUT_LENGTH, cfg.MAX_TARGET_LENGTH)
    say(f"data {data.source}: {len(train_rows)} train / {len(val_rows)} validation rows "
        f"({sum(data.dropped.values())} empty rows dropped)" + (f"; {note}" if note else ""))

    loaded, in_4bit = training.load_for_training(cfg.MODEL, cfg.LOAD_IN_4BIT, cfg.ALLOW_CPU_FALLBACK, state.device)
    targets = training.resolve_target_modules(loaded.model, cfg.TARGET_MODULES, family)
    if state.is_main_process:   # only after every check passed: nothing is touched by a run that fails to start
        training.prepare_run_dir(plan, cfg, data.local_files, cfg.KEEP_CHECKPOINTS)
    state.wait_for_everyone()
    model = training.add_lora(loaded, targets, cfg.LORA_R, cfg.LORA_ALPHA, cfg.LORA_DROPOUT, in_4bit,
                              cfg.GRADIENT_CHECKPOINTING)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"model {cfg.MODEL} ({family}{', 4-bit' if in_4bit else ''}) on {state.device} x{state.num_processes}: "
        f"LoRA r={cfg.LORA_R} on {targets}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.3%})")

    instruction = cfg.INSTRUCTION or DEFAULT_INSTRUCTION
    spec = training.EncodingSpec(family, instruction, seq2seq_prefix(model_config) if family == SEQ2SEQ else "",
                                 cfg.MAX_INPUT_LENGTH, cfg.MAX_TARGET_LENGTH)
    cache = resolve(cfg.CACHE_DIR) if cfg.CACHE_DIR else None
    with state.main_process_first():   # one process tokenizes, the others read its cache
        train_ds, train_stats = training.tokenize_split(train_rows, loaded.tokenizer, spec, cache, "train")
        val_ds, val_stats = training.tokenize_split(val_rows, loaded.tokenizer, spec, cache, "validation")
    for name, stats in (("train", train_stats), ("validation", val_stats)):
        say(f"tokenized {name}: {stats['rows']} rows, mean {stats['mean_tokens']} / max {stats['max_tokens']} tokens, "
            f"{stats['truncated_dialogues']} dialogues and {stats['truncated_summaries']} summaries cut "
            f"(cache {stats['cache']})")

    record = run_record(cfg, loaded, family, targets, in_4bit, instruction, data, train_rows, val_rows)
    run = tracking.start_run(training.STAGE, cfg, ROOT, name=out.name) if state.is_main_process else None
    generation_eval = training.GenerationEval(
        [r["dialogue"] for r in val_rows], [r["summary"] for r in val_rows], GenerationSettings.from_config(cfg),
        cfg.EVAL_BATCH_SIZE, cfg.MAX_INPUT_LENGTH, instruction, family, cfg.MODEL, loaded.tokenizer)
    trainer = training.SummarizationTrainer(
        model=model, args=training.training_arguments(cfg, plan, state.device, ["wandb"] if run else "none"),
        train_dataset=train_ds, eval_dataset=val_ds, processing_class=loaded.tokenizer,
        data_collator=training.make_collator(loaded.tokenizer, state.device),
        callbacks=training.training_callbacks(cfg.SAVE_TOTAL_LIMIT, cfg.EARLY_STOPPING_PATIENCE),
        generation_eval=generation_eval, family=family)
    if plan.resume_from:
        say(f"resuming from {plan.resume_from.name} (its settings match this run)")
    trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)

    metrics = training.train_metrics(trainer, {
        "model": cfg.MODEL, "family": family, "device": str(state.device), "processes": state.num_processes,
        "precision": "4-bit + " + training.precision(state.device) if in_4bit else training.precision(state.device),
        "parameters": {"trainable": trainable, "total": total},
        "data": {"train": train_stats, "validation": val_stats}})
    if state.is_main_process:
        record.extra.update(best_step=metrics["best_step"], best_rougeL=metrics["best_rougeL"])
        training.save_outputs(plan, trainer.model, loaded.tokenizer, metrics, cfg, data.local_files, record,
                              cfg.KEEP_CHECKPOINTS)
        tracking.log(run, {"best/rougeL": metrics["best_rougeL"], "best/step": metrics["best_step"]})
    tracking.finish(run)
    state.wait_for_everyone()
    speed = metrics["throughput"]
    say(f"best validation ROUGE-L {metrics['best_rougeL']} at step {metrics['best_step']} (zero-shot "
        f"{metrics['zero_shot_rougeL']}); {speed['samples_per_s']} samples/s, {speed['tokens_per_s']} tokens/s, "
        f"peak RSS {metrics['memory']['peak_rss_mb']} MB")
    say(f"wrote {out} (adapter, tokenizer, train_metrics.json, loss_curve.png, run_config.json)")
    return {"output_dir": str(out), **metrics}


if __name__ == "__main__":
    run_cli(main)
