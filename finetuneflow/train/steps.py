"""The heavy part of a training run (torch, transformers, peft), after preflight.py has decided:

1. `begin`: the process state (one per device under `accelerate launch`) and the seed;
   lora.load_base, `decide` (precision, decoding defaults) and `tokenize` run every check that
   needs the model or the tokenizer (only the tokenized-split cache is written);
   `plan_evaluations` fixes the evaluation subset and the selection rule.
2. `start`: the run folder is prepared (main process) - from here on a failure leaves an
   unfinished run that the next command resumes, or replaces when it is not worth keeping.
3. `make_model` (a new LoRA adapter, or dpo/orpo's START_ADAPTER), `build_trainer`,
   `run_training` (a non-finite loss marks the run failed and stops with one line; running out of
   memory stops with one line of fixes and leaves the run resumable), `finish` (metrics, the
   adapter folder, run_config.json last).
OBJECTIVE=dpo|orpo differs only in its data, model and trainer (train/preference.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import set_seed

from finetuneflow.contract.errors import UserError

from finetuneflow.contract.paths import ROOT
from finetuneflow.contract.record import Lineage, RunRecord, Split, fingerprint, ids_digest, portable
from finetuneflow.model.backends.hf import parameter_count
from finetuneflow.model.family import SEQ2SEQ
from finetuneflow.model.loading import local_or_hub
from finetuneflow.model.prompts import prompt_style, seq2seq_prefix
from finetuneflow.quality import tracking
from finetuneflow.train import encoding, evaluation, outputs, preference, trackers
from finetuneflow.train.lora import Base, add_lora, load_start_adapter, lora_facts
from finetuneflow.model.precision import resolve_training_precision
from finetuneflow.train.preflight import TrainJob
from finetuneflow.train.run_dir import complete_checkpoints, mark_failed, prepare_run_dir
from finetuneflow.train.settings import STAGE
from finetuneflow.train.start_adapter import trained_fingerprints
from finetuneflow.train.trainer import (GenerationEval, NonFiniteTraining, SummarizationTrainer, process_state,
                                        training_arguments, training_callbacks)


def begin(job: TrainJob) -> None:
    """The process state and the seed (before any weights are made or loaded); an explicit
    precision this device cannot run fails here."""
    job.state = process_state()
    set_seed(job.settings.seed)
    if str(job.settings.precision).lower() in ("bf16", "fp16"):
        resolve_training_precision(job.settings.precision, job.state.device, "", False)
    job.say(f"data {job.data.source}: {len(job.train_rows)} train / {len(job.val_rows)} validation rows "
            f"({sum(job.data.dropped.values())} empty rows dropped)" + (f"; {job.note}" if job.note else ""))


def encoding_spec(job: TrainJob, base: Base) -> encoding.EncodingSpec:
    prompt = base.loaded.prompt(job.instruction)   # the family uses what applies to it (instruction or prefix)
    return encoding.EncodingSpec(base.family, prompt.instruction, prompt.prefix, job.settings.max_input_length,
                                 job.settings.max_target_length)


def tokenize(job: TrainJob, base: Base) -> dict:
    """Both splits as token ids (one process tokenizes, the others read its cache): the rows, or
    for dpo/orpo their preference pairs (train/preference.py)."""
    spec, tokenizer = encoding_spec(job, base), base.loaded.tokenizer
    with job.state.main_process_first():
        if job.settings.preference:
            tokenized = preference.tokenize(job, tokenizer, spec)
        else:
            tokenized = {"stats": {}}
            for name, rows in (("train", job.train_rows), ("validation", job.val_rows)):
                tokenized[name], tokenized["stats"][name] = encoding.tokenize_split(rows, tokenizer, spec, job.cache,
                                                                                    name)
            tokenized["eval_lengths"] = [len(ids) for ids in tokenized["validation"]["input_ids"]]
    what = "pairs" if job.settings.preference else "rows"
    for name, stats in tokenized["stats"].items():
        job.say(f"tokenized {name}: {stats['rows']} {what}, mean {stats['mean_tokens']} / max {stats['max_tokens']} "
                f"tokens, {stats['truncated_dialogues']} dialogues and {stats['truncated_summaries']} summaries cut "
                f"(cache {stats['cache']})")
    for name, counts in job.pairs.items():
        kinds = ", ".join(f"{kind} {c['pairs']} (cannot apply to {c['skipped']})"
                          for kind, c in counts["kinds"].items())
        job.say(f"{name} pairs: {counts['pairs']} from {counts['rows']} rows ({counts['rows_without_pair']} "
                f"with none): {kinds}")
    return tokenized


def evaluation_subset(job: TrainJob, base: Base, tokenized: dict) -> GenerationEval:
    """The fixed, length-stratified validation rows every evaluation generates (train/evaluation.py)."""
    s = job.settings
    wanted = s.eval_generate_samples
    if wanted is None:
        wanted = 0 if base.family == SEQ2SEQ else evaluation.CAUSAL_EVAL_SAMPLES
    order = evaluation.stratified_order(tokenized["eval_lengths"], wanted, s.data_seed)
    dialogues, references = list(job.val_rows["dialogue"]), list(job.val_rows["summary"])
    subset = [dialogues[i] for i in order]
    selectable, why = evaluation.rate_is_selectable(subset)
    # DECODING=mbr is recorded for the later stages; in-training evaluations decode its greedy part
    return GenerationEval(subset, [references[i] for i in order], job.generation.without_mbr(), s.eval_batch_size,
                          s.max_input_length, job.instruction, base.family, s.model, base.loaded.tokenizer,
                          float(s.eval_budget_seconds), selectable, why)


def summary_lengths(job: TrainJob, base: Base) -> list[int]:
    """Tokens of each training summary as the model learns it (EOS included, at most MAX_TARGET_LENGTH)."""
    summaries = [str(text) for text in job.train_rows["summary"]]
    if not summaries:
        return []
    ids = base.loaded.tokenizer(summaries, add_special_tokens=False)["input_ids"]
    return [min(len(row) + 1, job.settings.max_target_length) for row in ids]


def decide(job: TrainJob, base: Base) -> None:
    """Precision and decoding (family defaults from the training summaries), before anything is
    written (a MIN_NEW_TOKENS over the resolved maximum fails here)."""
    s = job.settings
    job.precision = resolve_training_precision(s.precision, job.state.device, base.family, base.in_4bit,
                                               parameter_count(base.loaded.model)[1])
    lengths = summary_lengths(job, base) if s.max_new_tokens is None else []
    job.generation, job.generation_sources = evaluation.resolve_generation(base.family, s.generation, lengths,
                                                                          s.max_target_length)
    job.say(f"precision: {job.precision.describe()} ({job.precision.reason})")


def plan_evaluations(job: TrainJob, base: Base, tokenized: dict) -> None:
    """The evaluation subset and the selection rule in force, said once."""
    s = job.settings
    job.eval_spec = evaluation_subset(job, base, tokenized)
    job.select_on, job.select_note = s.select_on, ""
    if s.select_on == "rougeL_faithful" and not job.eval_spec.rate_selectable:
        job.select_on = "rougeL"
        job.select_note = f"SELECT_ON=rougeL_faithful falls back to rougeL: {job.eval_spec.rate_note}"
    g, spec = job.generation, job.eval_spec
    sources = "; ".join(f"{k}: {v}" for k, v in job.generation_sources.items())
    job.say(f"evaluations generate {len(spec.dialogues)} of {len(job.val_rows)} validation rows (length-stratified) "
            f"with num_beams={g.num_beams}, max_new_tokens={g.max_new_tokens}" + (f" ({sources})" if sources else "")
            + (f"; budget {spec.budget_seconds:g} s per evaluation" if spec.budget_seconds else "; no time budget")
            + ("; DECODING=mbr is recorded for evaluation and serving (in-training evaluations decode greedily)"
               if g.decoding == "mbr" else "")
            + f"; best checkpoint by {job.select_on}"
            + (f" (margin {s.faithfulness_margin:g})" if job.select_on == "rougeL_faithful" else ""))
    if job.select_note:
        job.say(job.select_note)


def start(job: TrainJob) -> None:
    """Only after every check passed is the run folder touched (main process)."""
    if job.state.is_main_process:
        prepare_run_dir(job.plan, job.settings.recorded, job.input_files, job.settings.keep_checkpoints)
    job.state.wait_for_everyone()


def trained_rows(job: TrainJob) -> list[str]:
    """Fingerprints of every dialogue the adapter has learned from: this run's rows, and for dpo/orpo
    those the start adapter was trained on (the evaluation stage refuses them all)."""
    own = [fingerprint(d) for d in job.train_rows["dialogue"]]
    known = set(own)
    return own + [f for f in dict.fromkeys(trained_fingerprints(job.start)) if f not in known]


def run_record(job: TrainJob, base: Base, lora: dict) -> RunRecord:
    """What later stages inherit from the adapter folder."""
    s, data, seq2seq = job.settings, job.data, base.family == SEQ2SEQ
    split = Split(source=portable(data.source), hub_config=s.hub_config, columns=data.columns,
                  normalize=bool(s.normalize), seed=s.data_seed, val_fraction=s.val_fraction,
                  test_fraction=s.test_fraction, made_from_single_file=data.made_splits,
                  train_samples=s.train_samples, val_samples=s.val_samples, train_rows=len(job.train_rows),
                  validation_rows=len(job.val_rows), dropped_empty_rows=data.dropped,
                  train_fingerprints=trained_rows(job),
                  validation_ids=ids_digest(job.val_rows["id"]))
    return RunRecord(
        STAGE, family=base.family, instruction=job.instruction,
        prompt_style="seq2seq" if seq2seq else prompt_style(base.loaded.tokenizer),
        seq2seq_prefix=seq2seq_prefix(base.loaded.config) if seq2seq else None,
        max_input_length=s.max_input_length, max_target_length=s.max_target_length, load_in_4bit=base.in_4bit,
        backend="transformers", generation=job.generation,
        lineage=Lineage(base_model=portable(local_or_hub(s.model)), adapter=portable(job.out)),
        split=split, extra={"lora": lora, "objective": s.objective, "precision": job.precision.as_record(),
                            "generation_sources": job.generation_sources})


def make_model(job: TrainJob, base: Base):
    """The model that trains: a new LoRA adapter on the base (sft), or START_ADAPTER (dpo/orpo)."""
    s = job.settings
    if job.start is not None:
        model = load_start_adapter(base.loaded, job.start.path, base.in_4bit, s.gradient_checkpointing)
        what = f"{s.objective} of the adapter {job.start.path.name} (LoRA r={lora_facts(model)['r']})"
    else:
        model = add_lora(base.loaded, base.targets, s.lora_r, s.lora_alpha, s.lora_dropout, base.in_4bit,
                         s.gradient_checkpointing)
        what = f"LoRA r={s.lora_r} on {base.targets}"
    trainable, total = model.get_nb_trainable_parameters()
    job.say(f"model {s.model} ({base.family}{', 4-bit' if base.in_4bit else ''}) on {job.state.device} "
            f"x{job.state.num_processes}: {what}: {trainable:,} trainable of {total:,} parameters "
            f"({trainable / total:.3%})")
    if job.inherited:
        job.say(f"from {job.start.path.name}'s record: {', '.join(job.inherited)}")
    return model


def build_trainer(job: TrainJob, base: Base, model, tokenized: dict, active: list[str]) -> SummarizationTrainer:
    """The Trainer with its evaluation (generated ROUGE on the subset), collator and callbacks."""
    s, tokenizer = job.settings, base.loaded.tokenizer
    callbacks = training_callbacks(s.save_total_limit, s.early_stopping_patience, job.select_on, s.faithfulness_margin)
    if s.preference:
        return preference.build_trainer(job, model, tokenizer, tokenized, active or "none", callbacks)
    args = training_arguments(s, job.plan, job.state.device, active or "none", job.precision)
    args.run_name = job.out.name
    return SummarizationTrainer(
        model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        processing_class=tokenizer, data_collator=encoding.make_collator(tokenizer, job.state.device),
        callbacks=callbacks, generation_eval=job.eval_spec, select_on=job.select_on,
        faithfulness_margin=s.faithfulness_margin, eval_precision=s.eval_precision)


def start_tracking(job: TrainJob) -> tuple[object, list[str]]:
    """The W&B run (when W&B logs) and the trackers the Trainer reports to (train/trackers.py)."""
    if not job.state.is_main_process:
        return None, [t for t in job.trackers if t != "wandb"]
    active = trackers.prepare(job.trackers, job.tracking_dir, job.out.name, job.say)
    run = None
    if "wandb" in active:
        run = tracking.start_run(STAGE, job.settings.recorded, ROOT, name=job.out.name)
        if run is None:
            active.remove("wandb")
    if active:
        job.say(f"tracking: {trackers.where(active)}")
    return run, active


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
    except (torch.OutOfMemoryError, RuntimeError) as exc:   # the run stays unfinished: resumable, not failed
        problem = out_of_memory(exc, job.settings, job.plan.checkpoints, job.state.device)
        if problem is None:
            raise
        raise problem from None


def out_of_memory(exc: BaseException, s, checkpoints: Path, device) -> UserError | None:
    """Out of memory while training (CUDA, MPS, or the CPU allocator's RuntimeError) as one line: the
    fixes in the order to try them, and what the next command does with the run folder (its complete
    checkpoints are kept, never half-written ones); None when `exc` is another error."""
    text = str(exc)
    if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in text \
            and "can't allocate memory" not in text:
        return None
    fixes = []
    if s.batch_size > 1:
        half = s.batch_size // 2
        accum = -(-s.batch_size * s.grad_accum // half)
        fixes.append(f"--BATCH_SIZE={half} --GRAD_ACCUM={accum} (the same batch of {s.batch_size * s.grad_accum})")
    if not s.gradient_checkpointing:
        fixes.append("--GRADIENT_CHECKPOINTING=True")
    if not s.load_in_4bit and torch.device(device).type == "cuda":
        fixes.append("--LOAD_IN_4BIT=True (QLoRA)")
    fixes.append(f"a shorter --MAX_INPUT_LENGTH (now {s.max_input_length})")
    saved = complete_checkpoints(checkpoints)
    state = (f"{saved[-1].name} is kept: the same command resumes from it, changed settings need --OVERWRITE=True "
             f"or a new --OUTPUT_DIR" if saved else
             "no checkpoint was saved yet: the next command starts over in the same folder")
    return UserError(f"training ran out of memory on {device} (BATCH_SIZE={s.batch_size} x GRAD_ACCUM="
                     f"{s.grad_accum}, MAX_INPUT_LENGTH={s.max_input_length}); try, in this order: "
                     f"{'; '.join(fixes)}; {state}")


def finish(job: TrainJob, base: Base, trainer: SummarizationTrainer, tokenized: dict, run) -> dict:
    """Metrics, then the adapter folder with run_config.json last (main process)."""
    s, device = job.settings, job.state.device
    trainable, total = trainer.model.get_nb_trainable_parameters()
    objective = {"objective": s.objective}
    if s.preference:
        objective["preference"] = preference.record_facts(job, float(trainer.args.beta))
    metrics = outputs.train_metrics(trainer, {
        "model": s.model, "family": base.family, "device": str(device), "processes": job.state.num_processes,
        "precision": ("4-bit + " if base.in_4bit else "") + job.precision.mode,
        "precision_detail": job.precision.as_record(),
        "generation": {**job.generation.as_dict(), "sources": job.generation_sources},
        "eval_precision": s.eval_precision,
        "parameters": {"trainable": trainable, "total": total}, "data": tokenized["stats"], **objective})
    if job.state.is_main_process:
        if s.preference:   # the start adapter's own LoRA (its record keeps the targets' order)
            lora = job.start.record.extra.get("lora") or lora_facts(trainer.model)
        else:
            lora = {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": s.lora_dropout, "target_modules": base.targets}
        record = run_record(job, base, lora)
        record.extra.update(best_step=metrics["best_step"], best_rougeL=metrics["best_rougeL"],
                            evaluation=metrics["evaluation"], selection=metrics["selection"], **objective)
        outputs.save_outputs(job.plan, trainer.model, base.loaded.tokenizer, metrics, job.settings.recorded,
                             job.input_files, record, job.settings.keep_checkpoints)
        tracking.log(run, {"best/rougeL": metrics["best_rougeL"], "best/step": metrics["best_step"]})
    job.state.wait_for_everyone()
    speed = metrics["throughput"]
    job.say(f"best validation ROUGE-L {metrics['best_rougeL']} at step {metrics['best_step']} "
            f"({'the start adapter' if s.preference else 'zero-shot'}: {metrics['zero_shot_rougeL']}); "
            f"{speed['samples_per_s']} samples/s, {speed['tokens_per_s']} tokens/s, "
            f"peak RSS {metrics['memory']['peak_rss_mb']} MB")
    share = speed.get("generation_share")
    job.say(f"in-training generation: {speed['generation_seconds']} s"
            + (f" = {100 * share:.1f}% of the {speed['wall_seconds']} s training wall clock" if share else "")
            + f"; validation loss {speed['eval_loss_seconds']} s")
    job.say(f"wrote {job.out} (adapter, tokenizer, train_metrics.json, loss_curve.png, run_config.json)")
    return {"output_dir": str(job.out), **metrics}
