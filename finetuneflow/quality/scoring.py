"""Scoring and comparing prediction files (eval_metrics_bart_lora.py).

`score_version` computes, per sample, every metric of quality/metrics.py (ROUGE, BERTScore,
sentence BLEU/chrF, lengths, failure buckets) and of quality/faithfulness.py (unsupported
mentions, speaker attribution, sentence support, coverage by position), plus the truncation
ledger from the eval record. `compare` gives a paired bootstrap interval for each metric's mean
difference between versions evaluated on the same samples, in the metric's direction; `by_bucket`
repeats every mean and every comparison within buckets of the rows (input length, truncated vs
intact, or any column of the predictions files). Several references per row (REFERENCE_COLUMNS):
ROUGE is the maximum over them with the mean beside it (`<key>_mean`), BLEU/chrF are sacreBLEU's
multi-reference scores (metrics.MULTI_REFERENCE_RULE, named in the summary and the notes).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import project_relative
from finetuneflow.contract.settings import FromConfig
from finetuneflow.quality import faithfulness as F
from finetuneflow.quality import metrics as M
from finetuneflow.quality.predictions import Predictions

WORDS_PER_TOKEN = 0.75       # English rule of thumb: an input limit in tokens -> words of dialogue
# Per-sample metrics compared between versions, with their direction (True: higher is better;
# None: a size, neither better nor worse). Faithfulness columns and check flags are added below.
SAMPLE_METRICS = {"rouge1": True, "rouge2": True, "rougeL": True, "rougeLsum": True, "bertscore_f1": True,
                  "chrf": True, "pred_words": None}
CHECK_METRICS = {f"check_{name}": False for name in F.CHECKS}          # share of samples flagged
FAITH_METRICS = {k: v for k, v in F.METRIC_COLUMNS.items()}
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
                 "bertscore_f1": "BERTScore F1", "chrf": "chrF (per sample)", "bleu": "BLEU (per sample)",
                 "pred_words": "prediction words", "unsupported_rate": "unsupported mentions (share)",
                 "unsupported_count": "unsupported mentions (count)",
                 "misattributed_rate": "misattributed sentences (share, experimental)",
                 "support_min": "weakest sentence support", "support_mean": "mean sentence support",
                 "coverage_begin": "coverage: first third", "coverage_middle": "coverage: middle third",
                 "coverage_end": "coverage: last third", "middle_recall": "middle recall (inputs over the limit)",
                 **{f"{k}_mean": f"{label} (mean over references)" for k, label in
                    (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"))},
                 "coverage_beyond_limit": "coverage beyond the input limit",
                 **{f"check_{name}": f"flagged: {name.replace('_', ' ')}"
                    + ("" if F.is_shipped(name) else " (experimental)") for name in F.CHECKS}}


@dataclass(frozen=True)
class ScoringSettings(FromConfig):
    """The eval_metrics_bart_lora.py settings that decide how versions are scored and compared."""
    bertscore_model: str | None = M.DEFAULT_BERTSCORE_MODEL
    bertscore_fallback: str | None = "minilm"
    bertscore_batch_size: int = 32
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    bootstrap_seed: int = 42
    truncation_words: int = 560
    faithfulness: bool = True
    encoder: str | None = None


@dataclass
class VersionScores:
    name: str
    source: Predictions
    frame: pd.DataFrame           # one row per sample: every metric, the flags and the bucket
    summary: dict                 # one row of summary_metrics
    bertscore: M.BertScoreResult
    truncation_source: str
    notes: list[str] = field(default_factory=list)
    faithful: list[dict] = field(default_factory=list)   # faithfulness rows (spans, examples) per sample


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


def input_limit_words(preds: Predictions, truncation_words: int) -> int:
    """The model's input limit in words of dialogue: from the eval record's token limit, else the
    TRUNCATION_WORDS estimate."""
    limit = ((preds.eval_record or {}).get("generation") or {}).get("max_input_length")
    return int(limit * WORDS_PER_TOKEN) if limit else truncation_words


def faithfulness_rows(preds: Predictions, settings: ScoringSettings, encoder) -> tuple[list[dict], list[str]]:
    """Faithfulness rows per sample (all None without a dialogue column), and notes."""
    if not settings.faithfulness:
        return [{} for _ in preds.ids], ["faithfulness not computed: FAITHFULNESS=False"]
    if not preds.has_dialogue:
        return [{} for _ in preds.ids], ["faithfulness not computed: the file has no dialogue column"]
    frame = preds.frame
    scored = F.score_samples(frame["prediction"].tolist(), frame["dialogue"].tolist(), encoder=encoder,
                             input_limit_words=input_limit_words(preds, settings.truncation_words))
    return scored.rows, list(scored.notes)


def _faith_columns(row: dict) -> dict:
    checks = F.flags(row) if row else {name: None for name in F.CHECKS}
    values = {column: row.get(column) for column in F.METRIC_COLUMNS}
    values.update({f"check_{name}": (None if flag is None else float(flag)) for name, flag in checks.items()})
    values["unsupported_spans"] = json.dumps(row.get("unsupported_spans") or [], ensure_ascii=False)
    values["weakest_sentence"] = row.get("weakest_sentence")
    values["faithfulness_reasons"] = row.get("reasons")
    return values


def sample_rows(preds: Predictions, rouge, bert, sentence, truncated, faithful) -> pd.DataFrame:
    frame = preds.frame
    rows = []
    for i, (p, r, d) in enumerate(zip(frame["prediction"], frame["reference"], frame["dialogue"])):
        flags = M.failure_flags(p, r, d, truncated[i])
        rows.append({"id": frame["id"].iat[i], **rouge[i], "bertscore_f1": bert.f1[i] if bert.computed else None,
                     **({f"reference{k + 1}": r for k, r in enumerate(preds.references[i]) if k}
                        if preds.references else {}),
                     **sentence[i], **M.length_row(p, r, d), "copy_share": flags["copy_share"],
                     "bucket": M.primary_bucket(flags), **{f"flag_{b}": bool(flags[b]) for b in M.BUCKETS},
                     "names_not_in_dialogue": ";".join(flags["names"]), "truncated": truncated[i],
                     "input_words": M.words(d) if d else None, **_faith_columns(faithful[i]),
                     "reference": r, "prediction": p})
    return pd.DataFrame(rows)


def _mean(values) -> float | None:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


def faithfulness_summary(per_sample: pd.DataFrame, settings: ScoringSettings) -> dict:
    """Means of the faithfulness columns and each check's flag rate with a bootstrap interval."""
    out = {f"faith_{column}": _mean(per_sample[column]) for column in F.METRIC_COLUMNS}
    for name in F.CHECKS:
        values = [v for v in per_sample[f"check_{name}"] if v is not None and not math.isnan(v)]
        low = high = None
        if values:
            rng = np.random.default_rng(settings.bootstrap_seed)
            arr = np.asarray(values)
            means = arr[rng.integers(0, len(arr), size=(settings.bootstrap_samples, len(arr)))].mean(axis=1)
            alpha = (1 - settings.confidence) / 2
            low, high = (float(x) for x in np.quantile(means, [alpha, 1 - alpha]))
        out.update({f"check_{name}_rate": _mean(values), f"check_{name}_low": low, f"check_{name}_high": high,
                    f"check_{name}_n": len(values)})
    return out


def version_summary(preds: Predictions, per_sample: pd.DataFrame, raw, bert, settings: ScoringSettings,
                    truncation_source: str) -> dict:
    predictions, references = per_sample["prediction"].tolist(), per_sample["reference"].tolist()
    boot = M.rouge_bootstrap(raw, settings.bootstrap_samples, settings.confidence, settings.bootstrap_seed)
    corpus = M.corpus_bleu_chrf(predictions, preds.references or references)
    lengths = M.length_summary(per_sample.to_dict("records"))
    summary = {"model": preds.name, "file": project_relative(preds.path), "format": preds.format,
               "samples": len(per_sample)}
    summary.update({key: float(per_sample[key].mean()) for key in M.ROUGE_KEYS})
    for key in M.ROUGE_KEYS:
        summary.update({f"{key}_boot_mid": boot[key]["mid"], f"{key}_boot_low": boot[key]["low"],
                        f"{key}_boot_high": boot[key]["high"]})
    summary.update({"bertscore_f1": bert.mean, "bertscore_rescaled": bert.rescaled if bert.computed else None,
                    "bertscore_model": bert.used_model if bert.computed else None,
                    "bertscore_comparable_with_published": bert.comparable if bert.computed else None,
                    "bleu": corpus["bleu"], "chrf": corpus["chrf"],
                    "pred_words_mean": lengths["pred_words"]["mean"], "ref_words_mean": lengths["ref_words"]["mean"],
                    "len_ratio_mean": (lengths["len_ratio"] or {}).get("mean"),
                    "compression_mean": (lengths["compression"] or {}).get("mean")})
    for bucket in (*M.BUCKETS, M.OK_BUCKET):
        summary[f"bucket_{bucket}"] = int((per_sample["bucket"] == bucket).sum())
    for bucket in M.BUCKETS:
        summary[f"flag_{bucket}"] = int(per_sample[f"flag_{bucket}"].sum())
    summary.update(faithfulness_summary(per_sample, settings))
    summary.update({"truncated_inputs": int(sum(bool(t) for t in per_sample["truncated"] if t is not None)),
                    "bleu_signature": corpus["bleu_signature"], "chrf_signature": corpus["chrf_signature"],
                    "bertscore_note": bert.note, "truncation_source": truncation_source})
    return summary


def reference_summary(preds: Predictions, per_sample: pd.DataFrame) -> dict:
    """How many references each row was scored against, the rule, and the means over references."""
    if not preds.references:
        return {"references": 1, "reference_rule": "one reference per row"}
    return {"references": len(preds.references[0]), "reference_rule": M.MULTI_REFERENCE_RULE,
            **{f"{key}_mean": float(per_sample[f"{key}_mean"].mean()) for key in M.ROUGE_KEYS}}


def score_version(preds: Predictions, settings: ScoringSettings, encoder=None, device: str | None = None
                  ) -> VersionScores:
    """Every metric for one predictions file (`encoder`: a loaded sentence encoder, shared across
    versions; None loads the default when faithfulness is on)."""
    frame = preds.frame
    predictions, references = frame["prediction"].tolist(), frame["reference"].tolist()
    several = preds.references                       # None: one reference per row
    raw = M.best_reference_scores(predictions, several) if several else M.rouge_scores(predictions, references)
    rouge = M.rouge_f1(raw)
    if several:
        rouge = [{**best, **mean} for best, mean in zip(rouge, M.rouge_multi(predictions, several)[1])]
    bert = M.bertscore(predictions, references, settings.bertscore_model, batch_size=settings.bertscore_batch_size,
                       device=device, fallback=settings.bertscore_fallback)
    truncated, truncation_source = _truncated(preds, settings.truncation_words)
    faithful, notes = faithfulness_rows(preds, settings, encoder)
    per_sample = sample_rows(preds, rouge, bert, M.sentence_bleu_chrf(predictions, several or references),
                             truncated, faithful)
    summary = version_summary(preds, per_sample, raw, bert, settings, truncation_source)
    summary.update(reference_summary(preds, per_sample))
    if several:
        notes = notes + [f"{len(several[0])} references per row ({', '.join(preds.reference_columns)}): "
                         f"{M.MULTI_REFERENCE_RULE}; BERTScore against the first"]
    summary["faithfulness_notes"] = "; ".join(notes)
    return VersionScores(preds.name, preds, per_sample, summary, bert, truncation_source,
                         list(preds.notes) + notes, faithful)


# --- comparing versions ------------------------------------------------------------------------------
def comparable_metrics(a: VersionScores, b: VersionScores) -> dict[str, bool | None]:
    """Metric -> direction, for every per-sample metric both versions have."""
    keys = {k: v for k, v in SAMPLE_METRICS.items() if k != "bertscore_f1"}
    keys.update({f"{k}_mean": True for k in M.ROUGE_KEYS
                 if f"{k}_mean" in a.frame.columns and f"{k}_mean" in b.frame.columns})
    if (a.bertscore.computed and b.bertscore.computed and a.bertscore.used_model == b.bertscore.used_model
            and a.bertscore.rescaled == b.bertscore.rescaled):
        keys["bertscore_f1"] = True
    for column, direction in {**CHECK_METRICS, **FAITH_METRICS}.items():
        if a.frame[column].notna().any() and b.frame[column].notna().any():
            keys[column] = direction
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


def paired(fa: pd.DataFrame, fb: pd.DataFrame, key: str, direction: bool | None, names: tuple[str, str],
           settings: ScoringSettings) -> dict | None:
    """The paired bootstrap of one metric on the samples where both versions have a value."""
    both = fa[key].notna() & fb[key].notna()
    if not both.any():
        return None
    result = M.paired_bootstrap(fa.loc[both, key].astype(float).to_numpy(), fb.loc[both, key].astype(float).to_numpy(),
                                settings.bootstrap_samples, settings.confidence, settings.bootstrap_seed)
    label = METRIC_LABELS.get(key, key)
    return {**result.record(), "dropped": int((~both).sum()),
            "statement": result.statement(label, names[0], names[1], direction)}


def compare_pair(a: VersionScores, b: VersionScores, ids: list[str], settings: ScoringSettings) -> dict:
    fa, fb = a.frame.set_index("id").loc[ids], b.frame.set_index("id").loc[ids]
    results = {}
    for key, direction in comparable_metrics(a, b).items():
        result = paired(fa, fb, key, direction, (a.name, b.name), settings)
        if result is not None:
            results[key] = result
    differing = [i for i in ids if fa.at[i, "prediction"].strip() != fb.at[i, "prediction"].strip()]
    pair = {"a": a.name, "b": b.name, "samples": len(ids), "metrics": results,
            "differing_predictions": len(differing), "differing_ids": differing[:20], "merge_pair": is_merge_pair(a, b)}
    if pair["merge_pair"]:
        pair["lossless_statement"] = (
            f"{a.name} and {b.name} give identical predictions on all {len(ids)} samples: the merge is lossless"
            if not differing else
            f"{a.name} and {b.name} differ on {len(differing)} of {len(ids)} samples: merging must be lossless, so "
            f"the two were generated differently (settings, dtype, base model) or the merge is broken")
    return pair


def compare(versions: list[VersionScores], shared_ids: list[str], settings: ScoringSettings) -> list[dict]:
    """Every pair (earlier, later): paired bootstrap of each metric's mean difference (later -
    earlier) on the shared samples, and how many predictions differ."""
    return [compare_pair(a, b, shared_ids, settings) for a, b in combinations(versions, 2)]


# --- buckets -------------------------------------------------------------------------------------
def bucket_values(version: VersionScores, column: str) -> pd.Series:
    """A column to bucket by: a per-sample metric or ledger column, else a column of the file."""
    if column in version.frame.columns:
        return version.frame.set_index("id")[column]
    extras = version.source.extras
    if extras is not None and column in extras.columns:
        return extras.set_index("id")[column]
    known = sorted(set(version.frame.columns) | set(extras.columns if extras is not None else []))
    raise UserError(f"--buckets: no column {column!r} in {version.name}; use one of: {', '.join(known)}")


def bucket_labels(spec: str, versions: list[VersionScores], ids: list[str]) -> dict[str, str]:
    """id -> bucket label for one spec: `column` (its values) or `column:600` / `column:300/600`
    (numeric thresholds: `<=600`, `>600`). Labels come from the first version's rows."""
    column, _, cuts = spec.partition(":")
    values = bucket_values(versions[0], column.strip()).loc[ids]
    if not cuts:
        return {i: f"{column}={v}" for i, v in values.items()}
    try:
        thresholds = sorted(float(c) for c in cuts.split("/") if c.strip())
    except ValueError:
        raise UserError(f"--buckets={spec}: thresholds must be numbers, e.g. input_words:600 or input_words:300/600")
    labels = {}
    for i, v in values.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            labels[i] = f"{column}=unknown"
            continue
        upper = next((t for t in thresholds if x <= t), None)
        lower = max((t for t in thresholds if t < x), default=None)
        if upper is None:
            labels[i] = f"{column}>{thresholds[-1]:g}"
        else:
            labels[i] = f"{column}<={upper:g}" if lower is None else f"{lower:g}<{column}<={upper:g}"
    return labels


def bucket_means(version: VersionScores, ids: list[str]) -> dict:
    frame = version.frame.set_index("id").loc[ids]
    row = {"model": version.name, "samples": len(ids)}
    for key in [*SAMPLE_METRICS, *CHECK_METRICS, *FAITH_METRICS]:
        if key in frame.columns:
            row[key] = _mean(frame[key].tolist())
    return row


def by_bucket(versions: list[VersionScores], shared_ids: list[str], specs: list[str],
              settings: ScoringSettings) -> list[dict]:
    """For each bucket spec and each of its buckets: every version's means and every paired
    comparison on the bucket's rows."""
    out = []
    for spec in specs:
        labels = bucket_labels(spec, versions, shared_ids)
        for label in sorted(set(labels.values())):
            ids = [i for i in shared_ids if labels[i] == label]
            out.append({"spec": spec, "bucket": label, "samples": len(ids),
                        "versions": [bucket_means(v, ids) for v in versions],
                        "comparisons": [compare_pair(a, b, ids, settings) for a, b in combinations(versions, 2)]})
    return out
