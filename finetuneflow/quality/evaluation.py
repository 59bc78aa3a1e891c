"""Evaluation of one model version (eval_bart_lora.py): generate summaries for dataset rows
through the engine (or the long-input wrapper), score every sample with ROUGE, and write the
predictions CSV with the truncation ledger (input tokens, tokens cut, windows) of every row.
Scoring and comparing prediction files is quality/scoring.py (eval_metrics_bart_lora.py).

Sharded (`accelerate launch --num_processes N eval_bart_lora.py ...`): each process generates
whole batches of the one-process plan (engine/sharding.py), the main process gathers every row in
order, scores them and writes the one CSV; the other processes write nothing. The stage's plan,
run and record are quality/eval_plan.py and quality/eval_run.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import sha256_file
from finetuneflow.quality import metrics as M
from finetuneflow.quality.predictions import write_predictions

if TYPE_CHECKING:   # torch and transformers load only when generating, not for scoring CSVs
    from finetuneflow.contract.decoding import LongInput, ResolvedGeneration
    from finetuneflow.engine.sharding import BatchJournal, Shard
    from finetuneflow.model.loaded import LoadedModel


# --- eval_bart_lora.py ----------------------------------------------------------------------------
@dataclass
class EvalReport:
    rows: list[dict]          # the predictions CSV rows
    record: dict              # what goes into <tag>_eval.json
    predictions_path: Path

    def log_table(self, run) -> None:
        """The predictions as a W&B table (the run is optional; see tracking.py)."""
        import wandb
        run.log({"eval/predictions": wandb.Table(dataframe=pd.DataFrame(self.rows))})


def evaluate_rows(loaded: LoadedModel, rows: list[dict], decoding: ResolvedGeneration, batch_size: int,
                  max_input_length: int | None, instruction: str, long_input: LongInput, predictions_path: Path,
                  tag: str, progress: bool = True, shard: Shard | None = None,
                  journal: BatchJournal | None = None) -> EvalReport | None:
    """Summarize `rows` ({id, dialogue, summary}), score them and write the predictions CSV; sharded,
    only the main process scores and writes (the others return None). `journal`: a resumable run's
    finished batches (quality/eval_parts.py)."""
    from finetuneflow.engine.generation import input_limit
    from finetuneflow.engine.sharding import summarize_sharded
    if not rows:
        raise UserError("no rows to evaluate: the split is empty or N_SAMPLES selected nothing")
    ids = [str(r["id"]) for r in rows]
    # One explicit limit for every LONG_INPUT mode (a causal prompt leaves room for the new tokens).
    limit = input_limit(loaded, decoding, max_input_length)
    from finetuneflow.quality.mbr import choose_rows
    result = summarize_sharded(loaded, [r["dialogue"] for r in rows], decoding, batch_size, limit, instruction,
                               long_input, ids, progress, shard, chooser=choose_rows, journal=journal)
    if result is None:
        return None
    return score_and_write(loaded, rows, result, batch_size, limit, instruction, long_input, predictions_path, tag)


def reference_columns(rows: list[dict], out_rows: list[dict], predictions: list[str]) -> tuple[list[dict], dict]:
    """Per-sample ROUGE against each row's references (REFERENCE_COLUMNS: rows carry `references`):
    the maximum over them in rouge1..rougeLsum, the mean in rouge1_mean..; and the record naming
    the convention. One reference: plain ROUGE F1 and no record."""
    references = [r.get("references") or [r["summary"]] for r in rows]
    count = max(len(refs) for refs in references)
    if count == 1:
        return M.rouge_per_sample(predictions, [refs[0] for refs in references]), {}
    best, mean = M.rouge_multi(predictions, references)
    for row, refs in zip(out_rows, references):
        row.update({f"reference{k + 1}": text for k, text in enumerate(refs) if k})
    scores = [{**b, **m} for b, m in zip(best, mean)]
    return scores, {"count": count, "csv_columns": ["reference", *(f"reference{k + 1}" for k in range(1, count))],
                    "rouge": M.MULTI_REFERENCE_RULE}


def score_and_write(loaded: LoadedModel, rows: list[dict], result, batch_size: int, limit: int, instruction: str,
                    long_input: LongInput, predictions_path: Path, tag: str) -> EvalReport:
    """Score the summaries of `rows`, write the predictions CSV and return the eval record."""
    ids = [str(r["id"]) for r in rows]
    dialogues, references = [r["dialogue"] for r in rows], [r["summary"] for r in rows]
    needed = loaded.family.count_inputs(loaded.tokenizer, dialogues, loaded.prompt(instruction))
    ledger = [{"input_tokens": n, "cut_tokens": max(0, n - limit) if cut else 0, "windows": w}
              for n, cut, w in zip(needed, result.truncated, result.windows)]
    out_rows = [{"id": i, "dialogue": d, "reference": r, "prediction": p, "pred_words": M.words(p),
                 "ref_words": M.words(r), **cut}
                for i, d, r, p, cut in zip(ids, dialogues, references, result.summaries, ledger)]
    scores, multi = reference_columns(rows, out_rows, result.summaries)
    mbr = mbr_record(result, len(rows))
    for row, score, choice in zip(out_rows, scores, result.mbr_rows or [None] * len(rows)):
        row.update(score)
        if mbr:
            row["mbr_choice"] = "" if choice is None else choice["choice"]
    path = write_predictions(Path(predictions_path), out_rows)
    averages = {**M.mean_scores(scores, [k for k in scores[0] if k.startswith("rouge")]),
                **M.mean_scores(out_rows, ("pred_words", "ref_words"))}
    truncated_ids = [i for i, t in zip(ids, result.truncated) if t]
    chunked = result.chunked
    record = {
        "tag": tag,
        "samples": len(rows),
        "averages": {k: round(v, 4) for k, v in averages.items()},
        "counts": {"samples": len(rows), "empty_predictions": sum(not p.strip() for p in result.summaries),
                   "truncated_inputs": len(truncated_ids), "chunked_inputs": chunked},
        "generation": {**result.settings, "batch_size": batch_size,
                       "batch_size_used": result.batch_size or batch_size,
                       "max_input_length": limit, "long_input": long_input,
                       "instruction": instruction if loaded.family == "causal" else None,
                       # batches each exact speed-up served (every engine call of a map-reduce counts)
                       "exact_speedups": result.speedups},
        "timing": result.timing(),
        "device": device_name(loaded),
        "truncated_ids": truncated_ids,
        "truncation": {"policy": long_input, "max_input_length": limit, "truncated": len(truncated_ids),
                       "chunked": chunked, "tokens_cut": sum(r["cut_tokens"] for r in ledger),
                       "intact": len(rows) - len(truncated_ids) - chunked},
        "predictions_sha256": sha256_file(path),   # pairs this record with its predictions file
    }
    if multi:
        record["references"] = multi
    if mbr:
        record["mbr"] = mbr
    return EvalReport(out_rows, record, path)


def mbr_record(result, rows: int) -> dict:
    """DECODING=mbr's part of the eval json: what was dropped and what a row cost, against its greedy
    part (the greedy summary is MBR's first candidate, so its cost is measured in the same run)."""
    totals = result.mbr_totals
    if not totals:
        return {}
    seconds = totals["greedy_seconds"] + totals["sample_seconds"] + totals["selection_seconds"]
    per_row = {"seconds_per_row": seconds / rows, "greedy_seconds_per_row": totals["greedy_seconds"] / rows,
               "sample_seconds_per_row": totals["sample_seconds"] / rows,
               "selection_seconds_per_row": totals["selection_seconds"] / rows,
               "tokens_per_row": totals["candidate_tokens"] / rows,
               "greedy_tokens_per_row": totals["greedy_tokens"] / rows}
    greedy = totals["greedy_seconds"]
    return {"candidates_per_row": totals["candidates"] / max(1, totals["rows"]),
            "chosen_greedy": sum(1 for r in result.mbr_rows if r and r["choice"] == 0),
            "dropped_unfaithful": totals["dropped"], "rows_all_flagged": totals["all_flagged"],
            "rows_unchecked": totals["unchecked"], "selections": totals["rows"],
            "cost": {**{k: round(v, 4) for k, v in per_row.items()},
                     "seconds_vs_greedy": round(seconds / greedy, 3) if greedy else None,
                     "tokens_vs_greedy": round(totals["candidate_tokens"] / totals["greedy_tokens"], 3)
                     if totals["greedy_tokens"] else None,
                     "note": "per dataset row; a row summarized in windows counts every window's candidates"}}


def device_name(loaded: LoadedModel) -> str:
    import torch
    device = torch.device(loaded.device) if loaded.device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
