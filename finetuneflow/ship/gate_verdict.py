"""The deploy gate's verdict on one artifact against the transformers model on the same rows.

* per artifact: ROUGE-1/2/L, the ROUGE-L difference to the transformers model with a paired
  bootstrap 95% interval (quality/metrics.paired_bootstrap over the same rows) and the share of
  identical summaries;
* the verdict: **ship** when the loss is not significant (the interval's upper bound is >= 0),
  else **hold** (RULE says it in words for the report); `smallest_shipping` names the smallest
  artifact that ships; `hold_reason` says in one line why one does not.

A new criterion goes here: a number per artifact computed in `judge`, a line in RULE, and its
reason in `hold_reason`; the report (ship/gate_report.py) shows what `judge` returns.
"""
from __future__ import annotations

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
RULE = ("ship when the 95% paired-bootstrap interval of ROUGE-L(artifact) - ROUGE-L(transformers) over the same "
        "rows has an upper bound >= 0 (the artifact is not significantly worse); otherwise hold")


def scores_of(summaries: list[str], rows: list[dict]) -> list[dict]:
    from finetuneflow.quality.metrics import rouge_per_sample
    return rouge_per_sample(summaries, [r["summary"] for r in rows])


def means(scores: list[dict]) -> dict:
    return {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in ("rouge1", "rouge2", "rougeL")}


def judge(reference: list[dict], scores: list[dict], reference_summaries: list[str], summaries: list[str]) -> dict:
    """ΔROUGE-L with its paired-bootstrap interval, identical summaries, and the verdict."""
    from finetuneflow.quality.metrics import paired_bootstrap
    paired = paired_bootstrap([s["rougeL"] for s in reference], [s["rougeL"] for s in scores], BOOTSTRAP_SAMPLES,
                              CONFIDENCE)
    identical = sum(a == b for a, b in zip(reference_summaries, summaries))
    return {"delta_rougeL": {"mean": round(paired.difference, 4), "low": round(paired.low, 4),
                             "high": round(paired.high, 4), "p_value": round(paired.p_value, 4),
                             "confidence": CONFIDENCE, "bootstrap_samples": BOOTSTRAP_SAMPLES},
            "identical": identical, "identical_share": round(identical / len(summaries), 4) if summaries else None,
            "verdict": "ship" if paired.high >= 0 else "hold"}


def smallest_shipping(rows: list[dict]) -> dict | None:
    shipping = [r for r in rows if r.get("verdict") == "ship"]
    return min(shipping, key=lambda r: r["bytes"]) if shipping else None


def hold_reason(row: dict) -> str:
    """Why an artifact's row does not ship, in a few words."""
    if row["verdict"] == "not run":
        return f"{row['label']} was not run ({row['why']})"
    d = row["delta_rougeL"]
    return f"{row['label']} holds (ROUGE-L {d['mean']:+.2f}, 95% CI [{d['low']:+.2f}, {d['high']:+.2f}])"
