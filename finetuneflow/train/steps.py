"""The heavy part of a training run (torch, transformers, peft), after preflight.py has decided:

1. `begin`: the process state (one per device under `accelerate launch`) and the seed;
   lora.load_base and `tokenize` run every check that needs the model or the tokenizer (only the
   tokenized-split cache is written).
2. `start`: the run folder is prepared (main process) - from here on a failure leaves an
   unfinished run that the next command resumes, or replaces when it is not worth keeping.
3. `build_trainer`, `run_training` (a non-finite loss marks the run failed and stops with one
   line), `finish` (metrics, the adapter folder, run_config.json last).
"""
from __future__ import annotations

from transformers import set_seed

from finetuneflow.contract.paths import ROOT
from finetuneflow.contract.record import Lineage, RunRecord, Split, fingerprint, ids_digest, portable
from finetuneflow.model.family import SEQ2SEQ
from finetuneflow.model.loading import local_or_hub
from finetuneflow.model.prompts import prompt_style, seq2seq_prefix
from finetuneflow.quality import tracking
from finetuneflow.train import encoding, outputs
from finetuneflow.train.lora import Base
from finetuneflow.train.preflight import TrainJob
from finetuneflow.train.run_dir import mark_failed, prepare_run_dir
from finetuneflow.train.settings import STAGE
from finetuneflow.train.trainer import (GenerationEval, NonFiniteTraining, SummarizationTrainer, precision,
                                        process_state, training_arguments, training_callbacks)


def begin(job: TrainJob) -> None:
    """The process state and the seed (before any weights are made or loaded)."""
    job.state = process_state()
    set_seed(job.settings.seed)
    job.say(f"data {job.data.source}: {len(job.train_rows)} train / {len(job.val_rows)} validation rows "
            f"({sum(job.data.dropped.values())} empty rows dropped)" + (f"; {job.note}" if job.note else ""))


def encoding_spec(job: TrainJob, base: Base) -> encoding.EncodingSpec:
    prompt = base.loaded.prompt(job.instruction)   # the family uses what applies to it (instruction or prefix)
    return encoding.EncodingSpec(base.family, prompt.instruction, prompt.prefix, job.settings.max_input_length,
                                 job.settings.max_target_length)


def tokenize(job: TrainJob, base: Base) -> dict:
    """Both splits as token ids (one process tokenizes, the others read its cache)."""
    spec = encoding_spec(job, base)
    with job.state.main_process_first():
        train_ds, train_stats = encoding.tokenize_split(job.train_rows, base.loaded.tokenizer, spec, job.cache, "train")
        val_ds, val_stats = encoding.tokenize_split(job.val_rows, base.loaded.tokenizer, spec, job.cache, "validation")
    for name, stats in (("train", train_stats), ("validation", val_stats)):
        job.say(f"tokenized {name}: {stats['rows']} rows, mean {stats['mean_tokens']} / max {stats['max_tokens']} "
                f"tokens, {stats['truncated_dialogues']} dialogues and {stats['truncated_summaries']} summaries cut "
                f"(cache {stats['cache']})")
    return {"train": train_ds, "validation": val_ds, "stats": {"train": train_stats, "validation": val_stats}}


def start(job: TrainJob) -> None:
    """Only after every check passed is the run folder touched (main process)."""
    if job.state.is_main_process:
        prepare_run_dir(job.plan, job.settings.recorded, job.data.local_files, job.settings.keep_checkpoints)
    job.state.wait_for_everyone()


def run_record(job: TrainJob, base: Base) -> RunRecord:
    """What later stages inherit from the adapter folder."""
    s, data, seq2seq = job.settings, job.data, base.family == SEQ2SEQ
    split = Split(source=portable(data.source), hub_config=s.hub_config, columns=data.columns,
                  normalize=bool(s.normalize), seed=s.seed, val_fraction=s.val_fraction,
                  test_fraction=s.test_fraction, made_from_single_file=data.made_splits,
                  train_samples=s.train_samples, val_samples=s.val_samples, train_rows=len(job.train_rows),
                  validation_rows=len(job.val_rows), dropped_empty_rows=data.dropped,
                  train_fingerprints=[fingerprint(d) for d in job.train_rows["dialogue"]],
                  validation_ids=ids_digest(job.val_rows["id"]))
    return RunRecord(
        STAGE, family=base.family, instruction=job.instruction,
        prompt_style="seq2seq" if seq2seq else prompt_style(base.loaded.tokenizer),
        seq2seq_prefix=seq2seq_prefix(base.loaded.config) if seq2seq else None,
        max_input_length=s.max_input_length, max_target_length=s.max_target_length, load_in_4bit=base.in_4bit,
        backend="transformers", generation=s.generation,
        lineage=Lineage(base_model=portable(local_or_hub(s.model)), adapter=portable(job.out)),
        split=split, extra={"lora": {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": s.lora_dropout,
                                     "target_modules": base.targets}})


def build_trainer(job: TrainJob, base: Base, model, tokenized: dict, run) -> SummarizationTrainer:
    """The Trainer with its evaluation (generated ROUGE), collator and callbacks."""
    s, tokenizer = job.settings, base.loaded.tokenizer
    generation_eval = GenerationEval(list(job.val_rows["dialogue"]), list(job.val_rows["summary"]), s.generation,
                                     s.eval_batch_size, s.max_input_length, job.instruction, base.family, s.model,
                                     tokenizer)
    return SummarizationTrainer(
        model=model, args=training_arguments(s, job.plan, job.state.device, ["wandb"] if run else "none"),
        train_dataset=tokenized["train"], eval_dataset=tokenized["validation"], processing_class=tokenizer,
        data_collator=encoding.make_collator(tokenizer, job.state.device),
        callbacks=training_callbacks(s.save_total_limit, s.early_stopping_patience), generation_eval=generation_eval)


def start_tracking(job: TrainJob):
    return tracking.start_run(STAGE, job.settings.recorded, ROOT, name=job.out.name) \
        if job.state.is_main_process else None


def run_training(job: TrainJob, trainer: SummarizationTrainer) -> None:
    """Train, resuming from the plan's checkpoint; a non-finite loss marks the run failed."""
    if job.plan.resume_from:
        job.say(f"resuming from {job.plan.resume_from.name} (its settings match this run)")
    try:
        trainer.train(resume_from_checkpoint=str(job.plan.resume_from) if job.plan.resume_from else None)
    except NonFiniteTraining as exc:
        if job.state.is_main_process:
            mark_failed(job.plan, str(exc).split(":", 1)[0])
        raise


def finish(job: TrainJob, base: Base, trainer: SummarizationTrainer, tokenized: dict, run) -> dict:
    """Metrics, then the adapter folder with run_config.json last (main process)."""
    device = job.state.device
    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics = outputs.train_metrics(trainer, {
        "model": job.settings.model, "family": base.family, "device": str(device),
        "processes": job.state.num_processes,
        "precision": ("4-bit + " if base.in_4bit else "") + precision(device),
        "parameters": {"trainable": trainable, "total": total}, "data": tokenized["stats"]})
    if job.state.is_main_process:
        record = run_record(job, base)
        record.extra.update(best_step=metrics["best_step"], best_rougeL=metrics["best_rougeL"])
        outputs.save_outputs(job.plan, trainer.model, base.loaded.tokenizer, metrics, job.settings.recorded,
                             job.data.local_files, record, job.settings.keep_checkpoints)
        tracking.log(run, {"best/rougeL": metrics["best_rougeL"], "best/step": metrics["best_step"]})
    job.state.wait_for_everyone()
    speed = metrics["throughput"]
    job.say(f"best validation ROUGE-L {metrics['best_rougeL']} at step {metrics['best_step']} (zero-shot "
            f"{metrics['zero_shot_rougeL']}); {speed['samples_per_s']} samples/s, {speed['tokens_per_s']} tokens/s, "
            f"peak RSS {metrics['memory']['peak_rss_mb']} MB")
    job.say(f"wrote {job.out} (adapter, tokenizer, train_metrics.json, loss_curve.png, run_config.json)")
    return {"output_dir": str(job.out), **metrics}
