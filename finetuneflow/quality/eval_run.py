"""The evaluation stage's run (eval_bart_lora.py), as named steps over its plan (eval_plan.py):

`begin` (this process's shard, the precision, the outputs claimed), `load` (the model in that
precision on this process's device), `evaluate` (generate with the decoding resolved once, score,
write the predictions CSV, the eval json and the finished run record; log to W&B when asked) and
`print_summary`. In a sharded run every process generates its share and the main process writes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from finetuneflow.contract.decoding import ResolvedGeneration
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.contract.record import Lineage, RunRecord, portable, write_record
from finetuneflow.engine.generation import effective_settings
from finetuneflow.contract.errors import UserError
from finetuneflow.engine.sharding import Shard, barrier, current_shard, gather_all
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import load_model
from finetuneflow.model.precision import Precision, precision_for
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.quality import eval_parts, tracking
from finetuneflow.quality.eval_plan import STAGE, EvalPlan
from finetuneflow.quality.evaluation import EvalReport, evaluate_rows


@dataclass
class EvalRun:
    plan: EvalPlan
    shard: Shard
    device: str | None              # DEVICE, else the GPU accelerate gave this process (None: the default)
    precision: Precision
    identity: str = ""              # what the part files hold (quality/eval_parts.py)
    load_seconds: float = 0.0


def begin(plan: EvalPlan) -> EvalRun:
    """This process's place (one process, or its share under `accelerate launch`), the precision
    (one that cannot run here fails now), and on the main process the outputs claimed with a
    started record: an interrupted run leaves its own record, never a foreign file."""
    settings = plan.settings
    shard = current_shard(settings.device)
    device = settings.device if settings.device or not shard.device else shard.device
    precision = precision_for(settings.model, settings.precision, device, bool(settings.load_in_4bit))
    identity = eval_parts.run_identity(plan.config, settings.model, plan.rows)
    check_processes(plan, shard, identity)
    if shard.main:
        write_record(plan.paths["run_config.json"].parent,
                     RunRecord(STAGE, extra={"tag": settings.tag, "status": "started"}), plan.config, plan.inputs,
                     name=plan.paths["run_config.json"].name)
    return EvalRun(plan, shard, device, precision, identity)


def check_processes(plan: EvalPlan, shard: Shard, identity: str) -> None:
    """Every process (every machine) runs the same evaluation, and its part file is this run's: the
    answers are shared, so every process stops with the same one line, before anything is written."""
    try:
        eval_parts.check_parts(plan.paths["predictions.csv"], identity, shard, plan.settings.overwrite)
        problem = ""
    except UserError as exc:
        problem = str(exc)
    answers = gather_all(shard, (identity, problem))
    differs = next((rank for rank, (other, _) in enumerate(answers) if other != answers[0][0]), None)
    if differs is not None:
        raise UserError(f"process {differs} of {shard.world} runs other settings, another model or other rows "
                        f"than process 0 (a machine with other flags, files or data); run the same command, "
                        f"with the same model and data, on every machine")
    problem = next((p for _, p in answers if p), "")
    if problem:
        raise UserError(problem)


def load(run: EvalRun) -> LoadedModel:
    started = time.perf_counter()
    loaded = load_model(run.plan.settings.model, load_in_4bit=bool(run.plan.settings.load_in_4bit),
                        device=run.device, dtype=run.precision.dtype)
    run.load_seconds = time.perf_counter() - started
    return loaded


def describe_model(run: EvalRun, loaded: LoadedModel) -> dict:
    plan, record = run.plan, run.plan.record
    return {"name": portable(plan.settings.model), "base": portable(loaded.base), "adapter": portable(loaded.adapter),
            "family": loaded.family, "kind": plan.kind, "backend": loaded.backend.name,
            "dtype": loaded.dtype, "precision": {**run.precision.as_dict(), "dtype": loaded.dtype},
            "lineage": {k: v for k, v in vars(record.lineage).items() if v} if record else {},
            "load_in_4bit": bool(plan.settings.load_in_4bit), "load_seconds": round(run.load_seconds, 2),
            "processes": run.shard.world}


def summarize_and_score(run: EvalRun, loaded: LoadedModel, decoding: ResolvedGeneration) -> EvalReport | None:
    """Every batch through this process's part file: one an earlier run of the same command
    finished is read back, each new one appended (quality/eval_parts.py)."""
    settings, predictions = run.plan.settings, run.plan.paths["predictions.csv"]
    journal = eval_parts.PartFile(predictions, run.identity, run.shard)
    if journal.done and run.shard.main:
        print(f"resuming: {len(journal.done)} batches of this process are in {journal.path.name}")
    report = evaluate_rows(loaded, run.plan.rows, decoding, settings.batch_size, settings.max_input_length,
                           settings.instruction or DEFAULT_INSTRUCTION, run.plan.long_input, predictions,
                           settings.tag, progress=True, shard=run.shard, journal=journal)
    if report is not None:
        report.record["resumed_batches"] = journal.reused    # the main process's batches read back
    return report


def eval_record(run: EvalRun, loaded: LoadedModel, report: EvalReport) -> dict:
    """<TAG>_eval.json: the report's scores, counts and decoding, and the model, data and overlap."""
    plan, settings = run.plan, run.plan.settings
    return {**report.record, "model": describe_model(run, loaded),
            "dataset": {"source": portable(plan.data.source), "split": settings.split, "rows": len(plan.rows),
                        "n_samples": settings.n_samples, "shuffle": settings.shuffle, "seed": settings.seed,
                        "columns": plan.data.columns, "dropped_empty_rows": plan.data.dropped},
            "training_overlap": {"rows": len(plan.overlap), "ids": plan.overlap[:50], "allowed": bool(plan.overlap)},
            "inherited_from_model_record": plan.inherited}


def write_finished(run: EvalRun, loaded: LoadedModel, summary: dict, decoding: ResolvedGeneration) -> None:
    """The eval json, then the finished run record (what the next stages inherit)."""
    plan, generation = run.plan, summary["generation"]
    finished = RunRecord(STAGE, family=loaded.family, backend=loaded.backend.name, dtype=loaded.dtype,
                         instruction=generation.get("instruction"), max_input_length=generation["max_input_length"],
                         lineage=plan.record.lineage if plan.record else Lineage(), generation=decoding.settings(),
                         extra={"tag": plan.settings.tag, "status": "finished", "decoding": generation,
                                "precision": summary["model"]["precision"], "processes": run.shard.world,
                                "predictions_sha256": summary["predictions_sha256"]})
    atomic_write_json(plan.paths["eval.json"], summary)
    write_record(plan.paths["run_config.json"].parent, finished, plan.config, plan.inputs,
                 name=plan.paths["run_config.json"].name)


def evaluate(run: EvalRun, loaded: LoadedModel) -> dict | None:
    """Generate, score and write everything (the main process; the others generate their share
    and return None), logging to W&B when WANDB is on and a key or offline mode is set."""
    settings = run.plan.settings
    decoding = effective_settings(loaded, settings.generation())   # resolved once for every engine call
    out = run.plan.paths["run_config.json"].parent
    tracker = tracking.start_run("eval", run.plan.config, out, name=settings.tag) \
        if settings.wandb and run.shard.main else None
    try:
        report = summarize_and_score(run, loaded, decoding)
        if report is None:
            finish_parts(run)
            return None
        summary = eval_record(run, loaded, report)
        write_finished(run, loaded, summary, decoding)
        finish_parts(run)
        tracking.log(tracker, {**{f"eval/{k}": v for k, v in summary["averages"].items()},
                               "eval/samples_per_s": summary["timing"]["samples_per_s"],
                               "eval/tokens_per_s": summary["timing"]["tokens_per_s"]})
        if tracker is not None:
            report.log_table(tracker)
    finally:
        tracking.finish(tracker)
    return summary


def finish_parts(run: EvalRun) -> None:
    """Once the main process has written the CSV and its records: every process deletes its own part
    file (on machines with their own disks, each has its own), the main process every one it sees."""
    barrier(run.shard)
    predictions = run.plan.paths["predictions.csv"]
    if run.shard.main:
        eval_parts.remove_parts(predictions)
    else:
        eval_parts.part_path(predictions, run.shard.rank).unlink(missing_ok=True)


def print_summary(run: EvalRun, loaded: LoadedModel, summary: dict) -> None:
    plan, settings = run.plan, run.plan.settings
    avg, counts, timing = summary["averages"], summary["counts"], summary["timing"]
    print(f"model {settings.model} ({plan.kind}, {loaded.family}, {loaded.backend.name}) on "
          f"{loaded.device}; {counts['samples']} {settings.split} rows of {plan.data.source}")
    if plan.inherited:
        print(f"  inherited from the model's run record: {', '.join(plan.inherited)}")
    if plan.overlap:
        print(f"  WARNING: {len(plan.overlap)} of these rows were training rows (ALLOW_OVERLAP=True): the scores "
              f"are not held-out scores")
    print(f"  generation: {summary['generation']}")
    multi = summary.get("references")
    print(f"  ROUGE-1 {avg['rouge1']:.2f}  ROUGE-2 {avg['rouge2']:.2f}  ROUGE-L {avg['rougeL']:.2f}  "
          f"ROUGE-Lsum {avg['rougeLsum']:.2f}  (mean of per-sample F1 x 100"
          + (f"; per sample the maximum over {multi['count']} references, mean over them: ROUGE-L "
             f"{avg['rougeL_mean']:.2f})" if multi else ")"))
    print_mbr(summary)
    print(f"  words: prediction {avg['pred_words']:.1f}, reference {avg['ref_words']:.1f}; "
          f"{counts['empty_predictions']} empty predictions; {counts['truncated_inputs']} inputs truncated, "
          f"{counts['chunked_inputs']} chunked (LONG_INPUT={plan.long_input})")
    processes = summary["model"]["processes"]
    print(f"  speed: {timing['samples_per_s']:.2f} samples/s, {timing['tokens_per_s']:.1f} generated tokens/s "
          f"({timing['seconds']:.1f} s, batch {summary['generation']['batch_size']}"
          + (f", {processes} processes" if processes > 1 else "") + f"); precision {loaded.dtype} "
          f"({summary['model']['precision']['reason']})")
    print(f"wrote {plan.paths['predictions.csv']} and {plan.paths['eval.json']}")


def print_mbr(summary: dict) -> None:
    """DECODING=mbr: what was dropped and what a row cost against its greedy part."""
    mbr = summary.get("mbr")
    if not mbr:
        return
    generation, cost = summary["generation"], mbr["cost"]
    print(f"  MBR: {generation['mbr_samples']} samples + greedy per row (temperature {generation['mbr_temperature']}, "
          f"top_p {generation['mbr_top_p']}, utility {generation['mbr_utility']}, seed {generation['mbr_seed']}); "
          f"greedy summary kept on {mbr['chosen_greedy']} rows; faithful filter "
          f"{'on' if generation['mbr_faithful'] else 'off'}: {mbr['dropped_unfaithful']} candidates dropped, "
          f"{mbr['rows_all_flagged']} rows with every candidate flagged")
    print(f"  MBR cost per row: {cost['seconds_per_row']:.2f} s ({cost['seconds_vs_greedy']}x the greedy part's "
          f"{cost['greedy_seconds_per_row']:.2f} s), {cost['tokens_per_row']:.0f} tokens "
          f"({cost['tokens_vs_greedy']}x greedy's)")
