"""Evaluation as library code: generate + score one split (eval_bart_lora.py), and score and
compare prediction files (eval_metrics_bart_lora.py).

`evaluate_rows` runs the shared engine (or the long-input wrapper) over dataset rows, scores
every sample with ROUGE and writes `<tag>_predictions.csv`. `score_version` computes every
metric of metrics.py for one predictions file; `compare` gives paired bootstrap intervals for
each metric difference between versions evaluated on the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from finetuneflow.quality import metrics as M
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import sha256_file
from finetuneflow.quality.predictions import Predictions, write_predictions

if TYPE_CHECKING:   # torch and transformers load only when generating, not for scoring CSVs
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.model.loading import LoadedModel


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


def evaluate_rows(loaded: LoadedModel, rows: list[dict], settings: GenerationSettings, batch_size: int,
                  max_input_length: int | None, instruction: str, long_input: str, predictions_path: Path, tag: str,
                  progress: bool = True) -> EvalReport:
    """Summarize `rows` ({id, dialogue, summary}), score them and write the predictions CSV."""
    from finetuneflow.engine.generation import default_input_limit, effective_settings
    from finetuneflow.engine.long_input import summarize_long
    if not rows:
        raise UserError("no rows to evaluate: the split is empty or N_SAMPLES selected nothing")
    ids = [str(r["id"]) for r in rows]
    dialogues, references = [r["dialogue"] for r in rows], [r["summary"] for r in rows]
    # One explicit limit for every LONG_INPUT mode (a causal prompt leaves room for the new tokens).
    limit = max_input_length or default_input_limit(loaded, effective_settings(loaded, settings))
    result = summarize_long(loaded, dialogues, settings, batch_size=batch_size, max_input_length=limit,
                            instruction=instruction, mode=long_input, progress=progress, ids=ids)
    scores = M.rouge_per_sample(result.summaries, references)
    out_rows = [{"id": i, "dialogue": d, "reference": r, "prediction": p, **s,
                 "pred_words": M.words(p), "ref_words": M.words(r)}
                for i, d, r, p, s in zip(ids, dialogues, references, result.summaries, scores)]
    path = write_predictions(Path(predictions_path), out_rows)
    averages = {**M.mean_scores(scores), **M.mean_scores(out_rows, ("pred_words", "ref_words"))}
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
                       "instruction": instruction if loaded.family == "causal" else None},
        "timing": result.timing(),
        "device": device_name(loaded),
        "truncated_ids": truncated_ids,
        "predictions_sha256": sha256_file(path),   # pairs this record with its predictions file
    }
    return EvalReport(out_rows, record, path)


def device_name(loaded: LoadedModel) -> str:
    import torch
    device = torch.device(loaded.device) if loaded.device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


# --- eval_metrics_bart_lora.py --------------------------------------------------------------------
SAMPLE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1", "chrf", "pred_words")
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
                 "bertscore_f1": "BERTScore F1", "chrf": "chrF (per sample)", "bleu": "BLEU (per sample)",
                 "pred_words": "prediction words"}


@dataclass
class VersionScores:
    name: str
    source: Predictions
    frame: pd.DataFrame           # one row per sample: every metric, the flags and the bucket
    summary: dict                 # one row of summary_metrics
    bertscore: M.BertScoreResult
    truncation_source: str
    notes: list[str] = field(default_factory=list)


def _truncated(preds: Predictions, truncation_words: int) -> tuple[list[bool | None], str]:
    """Which inputs were cut: from the eval's record when it names them, else estimated."""
    record = preds.eval_record or {}
    if "truncated_ids" in record:
        cut = set(map(str, record["truncated_ids"]))
        return [i in cut for i in preds.ids], f"{preds.path.stem.replace('_predictions', '')}_eval.json"
    if not preds.has_dialogue:
        return [None] * len(preds.ids), "unknown (no dialogue column)"
    return ([M.words(d) > truncation_words for d in preds.frame["dialogue"]],
            f"estimated: dialogue longer than {truncation_words} words")


def score_version(preds: Predictions, bertscore_model: str | None, bertscore_batch_size: int = 32,
                  bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 42,
                  truncation_words: int = 560, device: str | None = None) -> VersionScores:
    frame = preds.frame
    predictions, references = frame["prediction"].tolist(), frame["reference"].tolist()
    dialogues = frame["dialogue"].tolist()
    raw = M.rouge_scores(predictions, references)
    rouge = M.rouge_f1(raw)
    bert = M.bertscore(predictions, references, bertscore_model, batch_size=bertscore_batch_size, device=device)
    sentence = M.sentence_bleu_chrf(predictions, references)
    truncated, truncation_source = _truncated(preds, truncation_words)
    rows = []
    for i, (p, r, d) in enumerate(zip(predictions, references, dialogues)):
        flags = M.failure_flags(p, r, d, truncated[i])
        row = {"id": frame["id"].iat[i], **rouge[i],
               "bertscore_f1": bert.f1[i] if bert.computed else None, **sentence[i],
               **M.length_row(p, r, d), "copy_share": flags["copy_share"],
               "bucket": M.primary_bucket(flags), **{f"flag_{b}": bool(flags[b]) for b in M.BUCKETS},
               "names_not_in_dialogue": ";".join(flags["names"]), "reference": r, "prediction": p}
        rows.append(row)
    per_sample = pd.DataFrame(rows)
    boot = M.rouge_bootstrap(raw, bootstrap_samples, confidence, seed)
    corpus = M.corpus_bleu_chrf(predictions, references)
    lengths = M.length_summary(rows)
    summary = {"model": preds.name, "file": str(preds.path), "format": preds.format, "samples": len(rows)}
    for key in M.ROUGE_KEYS:
        summary[key] = float(per_sample[key].mean())
    for key in M.ROUGE_KEYS:
        summary.update({f"{key}_boot_mid": boot[key]["mid"], f"{key}_boot_low": boot[key]["low"],
                        f"{key}_boot_high": boot[key]["high"]})
    summary.update({"bertscore_f1": bert.mean, "bertscore_rescaled": bert.rescaled if bert.computed else None,
                    "bertscore_model": bert.model if bert.computed else None,
                    "bleu": corpus["bleu"], "chrf": corpus["chrf"],
                    "pred_words_mean": lengths["pred_words"]["mean"], "ref_words_mean": lengths["ref_words"]["mean"],
                    "len_ratio_mean": (lengths["len_ratio"] or {}).get("mean"),
                    "compression_mean": (lengths["compression"] or {}).get("mean")})
    for bucket in (*M.BUCKETS, M.OK_BUCKET):
        summary[f"bucket_{bucket}"] = int((per_sample["bucket"] == bucket).sum())
    for bucket in M.BUCKETS:
        summary[f"flag_{bucket}"] = int(per_sample[f"flag_{bucket}"].sum())
    summary.update({"bleu_signature": corpus["bleu_signature"], "chrf_signature": corpus["chrf_signature"],
                    "bertscore_note": bert.note, "truncation_source": truncation_source})
    return VersionScores(preds.name, preds, per_sample, summary, bert, truncation_source, list(preds.notes))


def _comparable_metrics(a: VersionScores, b: VersionScores) -> list[str]:
    keys = [k for k in SAMPLE_METRICS if k != "bertscore_f1"]
    if (a.bertscore.computed and b.bertscore.computed and a.bertscore.model == b.bertscore.model
            and a.bertscore.rescaled == b.bertscore.rescaled):
        keys.insert(4, "bertscore_f1")
    return keys


def _model_of(version: VersionScores) -> dict:
    record = version.source.eval_record
    return (record.get("model") or {}) if isinstance(record, dict) else {}


def is_merge_pair(a: VersionScores, b: VersionScores) -> bool:
    """One version is an adapter and the other a model merged from that adapter (merging must
    change nothing), decided from the lineage in their eval records, never from their names."""
    for adapter, merged in ((a, b), (b, a)):
        ma, mm = _model_of(adapter), _model_of(merged)
        source = ma.get("adapter") or ma.get("name")
        lineage = mm.get("lineage") or {}
        if ma.get("kind") == "adapter" and mm.get("kind") == "merged" and source \
                and source in (lineage.get("merged_from"), lineage.get("adapter")):
            return True
    return False


def compare(versions: list[VersionScores], shared_ids: list[str], bootstrap_samples: int = 1000,
            confidence: float = 0.95, seed: int = 42) -> list[dict]:
    """Every pair (earlier, later): paired bootstrap of each metric's mean difference (later -
    earlier) on the shared samples, and how many predictions differ."""
    pairs = []
    for a, b in combinations(versions, 2):
        fa = a.frame.set_index("id").loc[shared_ids]
        fb = b.frame.set_index("id").loc[shared_ids]
        results = {}
        for key in _comparable_metrics(a, b):
            result = M.paired_bootstrap(fa[key].astype(float).to_numpy(), fb[key].astype(float).to_numpy(),
                                        bootstrap_samples, confidence, seed)
            results[key] = {**result.record(), "statement": result.statement(METRIC_LABELS[key], a.name, b.name,
                                                                        None if key == "pred_words" else True)}
        differing = [i for i in shared_ids if fa.at[i, "prediction"].strip() != fb.at[i, "prediction"].strip()]
        pair = {"a": a.name, "b": b.name, "samples": len(shared_ids), "metrics": results,
                "differing_predictions": len(differing), "differing_ids": differing[:20],
                "merge_pair": is_merge_pair(a, b)}
        if pair["merge_pair"]:
            pair["lossless_statement"] = (
                f"{a.name} and {b.name} give identical predictions on all {len(shared_ids)} samples: the merge "
                f"is lossless"
                if not differing else
                f"{a.name} and {b.name} differ on {len(differing)} of {len(shared_ids)} samples: merging must be "
                f"lossless, so the two were generated differently (settings, dtype, base model) or the merge is broken")
        pairs.append(pair)
    return pairs
