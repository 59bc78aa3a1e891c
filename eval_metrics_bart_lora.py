"""Stage 5 - score and compare model versions: is LoRA effective, is merging lossless, is it ready?

Reads:  PREDICTIONS, one or more prediction CSVs: this project's (eval_bart_lora.py writes
        metrics/<tag>_predictions.csv) or the seed project's (human_summary, model_summary, an id column)
Writes: OUTPUT_DIR/<name>_metrics.csv     per sample: ROUGE, BERTScore, BLEU/chrF, lengths, failure bucket
        OUTPUT_DIR/summary_metrics.csv and .json   one row per version (+ paired comparisons in the json)
        OUTPUT_DIR/rouge1.png rouge2.png rougeL.png buckets.png score_distribution.png
        OUTPUT_DIR/report.html            self-contained: versions side by side, CIs, examples
        OUTPUT_DIR/eval_metrics.run_config.json

Run as:
    python eval_metrics_bart_lora.py                     # metrics/{baseline,lora,merged}_predictions.csv that exist
    python eval_metrics_bart_lora.py --predictions=../shared/data/seed_outputs/baseline_predictions.csv
    python eval_metrics_bart_lora.py --predictions=a.csv,b.csv --names=zero-shot,lora
Several references per row (REFERENCE_COLUMNS, or the columns eval_bart_lora.py --reference_columns
wrote and names in its eval json): ROUGE is the maximum over the references (rouge1..rougeLsum) with
the mean over them beside it (rouge1_mean..), BLEU and chrF use sacreBLEU's multi-reference scoring;
the summary's "references" and "reference_rule" columns and the report say which was used.
Versions must cover the same rows (same ids and references); differences between them get
paired bootstrap confidence intervals. BERTScore needs roberta-large from the Hub, or a local
model folder in BERTSCORE_MODEL; when neither is available the output says so and goes on.
"""
PREDICTIONS = ["metrics/baseline_predictions.csv", "metrics/lora_predictions.csv",
               "metrics/merged_predictions.csv"]  # CSV paths; the default list uses those that exist
NAMES = []                             # one display name per CSV; empty: from the file names (lora_predictions -> lora)
REFERENCE_COLUMNS = []                 # [list[str]] several references (summary1,summary2,...); []: the file's own
BERTSCORE_MODEL = "roberta-large"      # bert-score model id (rescaled with its baseline) or local folder; "" = skip
BERTSCORE_FALLBACK = "minilm"          # [str | None] BERTSCORE_MODEL unavailable offline: use minilm (labelled)
BERTSCORE_BATCH_SIZE = 32              # [int >= 1] pairs per BERTScore forward pass
BOOTSTRAP_SAMPLES = 1000               # [int >= 1] resamples for the ROUGE bootstrap aggregate and the paired CIs
CONFIDENCE = 0.95                      # [0 < float < 1] confidence level of every interval
BOOTSTRAP_SEED = 42                    # [int >= 0] makes every interval reproducible
ALLOW_DIFFERENT_SAMPLES = False        # True: compare versions on their shared ids instead of failing
TRUNCATION_WORDS = 560                 # [int >= 1] without an eval record: inputs over this many words count as cut
EXAMPLES = 6                           # [int >= 0] example predictions shown side by side in the report
FAITHFULNESS = True                    # unsupported mentions, speaker attribution, support, coverage by position
ENCODER = None                         # [str | None] sentence encoder folder for support; None: MiniLM if installed
BUCKETS = []                           # every metric per bucket: input_words:600, truncated, or any column (col:t1/t2)
OUTPUT_DIR = "metrics"                 # where everything is written

import re

from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import CSV_QUOTING, atomic_path, atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, write_record
from finetuneflow.contract.safety import check_output_file
from finetuneflow.contract.settings import configure

STAGE = "eval_metrics"
DEFAULT_PREDICTIONS = list(PREDICTIONS)
SUMMARY_COLUMNS = ("model", "samples", "references", "rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1",
                   "bleu", "chrf", "pred_words_mean", "ref_words_mean", "len_ratio_mean", "compression_mean",
                   "reference_rule")  # first; the rest follow
CHARTS = ("rouge1.png", "rouge2.png", "rougeL.png", "buckets.png", "score_distribution.png", "coverage.png")
FIXED_OUTPUTS = ("summary_metrics.csv", "summary_metrics.json", "report.html", "bucket_metrics.csv", *CHARTS)
SAFE_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")


def input_files(cfg) -> list:
    if list(cfg.PREDICTIONS) == DEFAULT_PREDICTIONS:
        found = [resolve(p).resolve() for p in DEFAULT_PREDICTIONS if resolve(p).is_file()]
        if not found:
            raise UserError(f"no predictions found ({', '.join(DEFAULT_PREDICTIONS)}); they are written by "
                            f"`python eval_bart_lora.py --tag=<name>`, or pass --predictions=<csv>[,<csv>...]")
        return found
    if not cfg.PREDICTIONS:
        raise UserError("--predictions is empty; pass one or more CSV paths separated by commas")
    return [resolve(p).resolve() for p in cfg.PREDICTIONS]


def read_versions(cfg, files: list) -> tuple[list, list[str]]:
    """The prediction files as versions (names checked: they become file names) and their shared ids."""
    from finetuneflow.quality.predictions import check_same_samples, read_predictions
    if cfg.NAMES and len(cfg.NAMES) != len(files):
        raise UserError(f"--names has {len(cfg.NAMES)} names for {len(files)} prediction files; give one per file")
    versions = [read_predictions(f, cfg.NAMES[i] if cfg.NAMES else None, list(cfg.REFERENCE_COLUMNS))
                for i, f in enumerate(files)]
    names = [v.name for v in versions]
    bad = [n for n in names if not SAFE_NAME.fullmatch(n)]
    if bad:
        raise UserError(f"version name {bad[0]!r} is not a safe file name (letters, digits, _ . -; it names "
                        f"<name>_metrics.csv); set --names")
    if len(set(names)) != len(names) or "summary" in names:
        raise UserError(f"version names must be unique and not 'summary' (got {', '.join(names)}); set --names")
    shared_ids = check_same_samples(versions, cfg.ALLOW_DIFFERENT_SAMPLES)
    if len(versions) > 1 and not shared_ids:
        raise UserError("the prediction files share no row ids: nothing can be compared")
    return versions, shared_ids


def check_outputs(cfg, names: list[str], files: list):
    """Every file this stage writes, checked against the output-safety rule before any scoring."""
    out = resolve(cfg.OUTPUT_DIR)
    marker = out / f"{STAGE}.run_config.json"
    for name in (*FIXED_OUTPUTS, *(f"{n}_metrics.csv" for n in names), marker.name):
        check_output_file(out / name, stage=STAGE, setting="OUTPUT_DIR", marker=marker, inputs=files)
    return out


def score_all(settings, versions_in: list, out) -> list:
    from finetuneflow.quality.encoder import load_encoder
    from finetuneflow.quality.scoring import score_version
    # load the sentence encoder once for every version; when it cannot load, each version's notes say why
    loaded = load_encoder(settings.encoder)[0] if settings.faithfulness else None
    versions = []
    for preds in versions_in:
        print(f"scoring {preds.name}: {len(preds.ids)} rows from {preds.path} ({preds.format} format)")
        scored = score_version(preds, settings, encoder=loaded if loaded is not None else settings.encoder)
        with atomic_path(out / f"{preds.name}_metrics.csv") as tmp:
            scored.frame.to_csv(tmp, index=False, float_format="%.4f", quoting=CSV_QUOTING)
        versions.append(scored)
    return versions


def write_summary(cfg, settings, versions: list, pairs: list, buckets: list, shared_ids: list[str], out) -> dict:
    import pandas as pd
    from finetuneflow.quality import report, report_faithfulness
    from finetuneflow.quality.metrics import BUCKET_RULES
    summary = pd.DataFrame([v.summary for v in versions])
    columns = list(SUMMARY_COLUMNS) + [c for c in summary.columns if c not in SUMMARY_COLUMNS]
    with atomic_path(out / "summary_metrics.csv") as tmp:
        summary[columns].to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "bucket_metrics.csv") as tmp:
        pd.DataFrame([{"spec": b["spec"], "bucket": b["bucket"], **row} for b in buckets for row in b["versions"]]
                     ).to_csv(tmp, index=False, float_format="%.4f")
    record = {"versions": [v.summary for v in versions], "bertscore": {v.name: v.bertscore.record() for v in versions},
              "shared_samples": len(shared_ids), "comparisons": pairs, "buckets": buckets,
              "bucket_rules": BUCKET_RULES,
              "settings": {"bootstrap_samples": cfg.BOOTSTRAP_SAMPLES, "confidence": cfg.CONFIDENCE,
                           "seed": cfg.BOOTSTRAP_SEED, "faithfulness": settings.faithfulness}}
    atomic_write_json(out / "summary_metrics.json", record)
    charts = {key: report.rouge_chart(versions, key, out / f"{key}.png") for key in ("rouge1", "rouge2", "rougeL")}
    charts["buckets"] = report.bucket_chart(versions, out / "buckets.png")
    charts["distribution"] = report.distribution_chart(versions, out / "score_distribution.png")
    charts["coverage"] = report_faithfulness.coverage_chart(versions, out / "coverage.png")
    sections = report_faithfulness.faithfulness_section(versions, pairs, cfg.EXAMPLES, charts["coverage"]) \
        + report.bucket_section(buckets, record["settings"])
    atomic_write_text(out / "report.html", report.html_report(versions, pairs, shared_ids, charts, cfg.EXAMPLES,
                                                              record["settings"], sections))
    return record


def _rate(s: dict, check: str) -> str:
    rate = s.get(f"check_{check}_rate")
    if rate is None:
        return "n/a"
    return f"{rate:.1%} [{s[f'check_{check}_low']:.1%}, {s[f'check_{check}_high']:.1%}]"


def print_results(versions: list, pairs: list, buckets: list) -> None:
    for v in versions:
        s = v.summary
        print(f"{v.name:>12}: ROUGE-1 {s['rouge1']:.2f}  ROUGE-2 {s['rouge2']:.2f}  ROUGE-L {s['rougeL']:.2f}  "
              f"ROUGE-Lsum {s['rougeLsum']:.2f}  BLEU {s['bleu']:.2f}  chrF {s['chrf']:.2f}  "
              f"BERTScore {'%.2f' % s['bertscore_f1'] if s['bertscore_f1'] is not None else 'n/a'}  "
              f"({s['samples']} samples, {s['bucket_ok']} ok"
              + (f"; max over {s['references']} references, ROUGE-L mean over them {s['rougeL_mean']:.2f})"
                 if s["references"] > 1 else ")"))
        print(f"{'':>12}  faithfulness: unsupported mentions {_rate(s, 'unsupported_mentions')}, unsupported "
              f"sentence {_rate(s, 'unsupported_sentence')}, misattribution (experimental) "
              f"{_rate(s, 'misattribution')}")
        print(f"{'':>12}  BERTScore {v.bertscore.note}")
        for note in v.notes:
            print(f"{'':>12}  note: {note}")
    for bucket in buckets:
        cells = "  ".join(f"{row['model']} ROUGE-L {row['rougeL']:.2f}" for row in bucket["versions"])
        print(f"bucket {bucket['bucket']} ({bucket['samples']} samples): {cells}")
    for pair in pairs:
        print(f"{pair['b']} vs {pair['a']} on {pair['samples']} shared samples "
              f"({pair['differing_predictions']} predictions differ):")
        for result in pair["metrics"].values():
            print(f"  {result['statement']}")
        if pair.get("lossless_statement"):
            print(f"  {pair['lossless_statement']}")


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    files = input_files(cfg)
    versions_in, shared_ids = read_versions(cfg, files)
    out = check_outputs(cfg, [v.name for v in versions_in], files)
    names = [v.name for v in versions_in]
    given = files if list(cfg.PREDICTIONS) == DEFAULT_PREDICTIONS else list(cfg.PREDICTIONS)   # as the user named them
    # claim the outputs first: an interrupted run leaves its own record, so the next run may replace them
    write_record(out, RunRecord(STAGE, extra={"compared": names, "status": "started"}), cfg, given,
                 name=f"{STAGE}.run_config.json")
    from finetuneflow.quality.scoring import ScoringSettings, by_bucket, compare
    settings = ScoringSettings.from_config(cfg)
    versions = score_all(settings, versions_in, out)
    pairs = compare(versions, shared_ids, settings)
    buckets = by_bucket(versions, shared_ids, list(cfg.BUCKETS), settings)
    record = write_summary(cfg, settings, versions, pairs, buckets, shared_ids, out)
    write_record(out, RunRecord(STAGE, extra={"compared": names, "shared_samples": len(shared_ids),
                                              "status": "finished"}), cfg, given, name=f"{STAGE}.run_config.json")
    print_results(versions, pairs, buckets)
    print(f"wrote {out / 'summary_metrics.csv'}, {out / 'report.html'} and {len(versions)} per-sample metrics CSVs")
    return record


if __name__ == "__main__":
    run_cli(main)
