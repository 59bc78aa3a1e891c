"""The deploy gate's verdict on one artifact against the transformers model on the same rows.

An artifact **ships** only when every criterion that could be measured passes; each criterion is a
dict {name, passed (True | False | None: not measured, with `skipped`), rule, its numbers}:

* `rougeL`: ΔROUGE-L (artifact - transformers) with a paired bootstrap 95% interval
  (quality/metrics.paired_bootstrap over the same rows); passes when the interval's upper bound is
  >= 0 (the artifact is not significantly worse);
* `unsupported_mentions`: the share of summaries with at least one name, number, time or amount
  their dialogue does not contain (quality/faithfulness.py's shipped `unsupported_mentions` check),
  artifact vs transformers, non-inferiority: passes when the upper bound of the paired 95% interval
  of the difference is <= +`Margins.unsupported` points;
* `runaway`: the share of summaries that hit the token limit without an end token (the engine's
  finish reason "length"), artifact vs transformers, non-inferiority with `Margins.runaway` points;
* `server`: llama-server's summaries (ship/gate_server.py) equal the in-process backend's on every
  compared row, except rows where the in-process run itself gives other text at batch size 1 than
  batched (batch-order noise, measured on the rows that differ).

`smallest_shipping` names the smallest artifact that ships; `hold_reason` says in one line why
one does not. A new criterion: a function here returning that dict, added in the gate's run
(ship/deploy_gate.py); the report (ship/gate_report.py) shows every criterion it finds.
"""
from __future__ import annotations

from dataclasses import dataclass

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Margins:
    """Non-inferiority margins in percentage points of the share of summaries."""
    unsupported: float = 5.0
    runaway: float = 3.0


RULES = {
    "rougeL": "the 95% paired-bootstrap interval of ROUGE-L(artifact) - ROUGE-L(transformers) has an upper bound "
              ">= 0 (not significantly worse)",
    "unsupported_mentions": "share of summaries with a name, number, time or amount not in their dialogue "
                            "(quality/faithfulness.py's shipped check): the upper bound of the 95% paired-bootstrap "
                            "interval of artifact - transformers is <= +{margin:g} points",
    "runaway": "share of summaries that hit the token limit without an end token: the upper bound of the 95% "
               "paired-bootstrap interval of artifact - transformers is <= +{margin:g} points",
    "server": "llama-server's summaries (the GGUF's own chat template, the Modelfile's parameters) equal the "
              "in-process llama.cpp backend's on every compared row, except rows where the in-process run's own "
              "batch-size-1 and batched texts differ (batch-order noise)",
}


def rule_text(margins: Margins) -> dict:
    return {"rougeL": RULES["rougeL"], "unsupported_mentions": RULES["unsupported_mentions"].format(
        margin=margins.unsupported), "runaway": RULES["runaway"].format(margin=margins.runaway),
        "server": RULES["server"]}


def scores_of(summaries: list[str], rows: list[dict]) -> list[dict]:
    from finetuneflow.quality.metrics import rouge_per_sample
    return rouge_per_sample(summaries, [r["summary"] for r in rows])


def means(scores: list[dict]) -> dict:
    return {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in ("rouge1", "rouge2", "rougeL")}


def _interval(paired) -> dict:
    return {"mean": round(paired.difference, 4), "low": round(paired.low, 4), "high": round(paired.high, 4),
            "p_value": round(paired.p_value, 4), "confidence": CONFIDENCE, "bootstrap_samples": BOOTSTRAP_SAMPLES}


def rouge_criterion(reference: list[dict], scores: list[dict]) -> dict:
    from finetuneflow.quality.metrics import paired_bootstrap
    paired = paired_bootstrap([s["rougeL"] for s in reference], [s["rougeL"] for s in scores], BOOTSTRAP_SAMPLES,
                              CONFIDENCE)
    delta = _interval(paired)
    return {"name": "rougeL", "passed": delta["high"] >= 0, "delta": delta, "rule": RULES["rougeL"]}


def unsupported_flags(summaries: list[str], dialogues: list[str]) -> list[bool | None]:
    """Per summary: has it an unsupported mention (None: the check cannot read it, e.g. empty)."""
    from finetuneflow.quality.faithfulness import check_summary
    return [check_summary(s, d, checks=("unsupported_mentions",)).flags["unsupported_mentions"]
            for s, d in zip(summaries, dialogues)]


def rate_criterion(name: str, reference: list[bool | None], flags: list[bool | None], margin: float,
                   **extra) -> dict:
    """Non-inferiority of a per-summary yes/no rate (in points): paired rows where both sides answer."""
    from finetuneflow.quality.metrics import paired_bootstrap
    pairs = [(float(a), float(b)) for a, b in zip(reference, flags) if a is not None and b is not None]
    if not pairs:
        return {"name": name, "passed": None, "skipped": "no summary could be checked on both sides",
                "rule": RULES[name].format(margin=margin)}
    paired = paired_bootstrap([100 * a for a, _ in pairs], [100 * b for _, b in pairs], BOOTSTRAP_SAMPLES,
                              CONFIDENCE)
    delta = _interval(paired)
    return {"name": name, "passed": delta["high"] <= margin, "margin": margin, "rows": len(pairs),
            "reference_rate": round(paired.mean_a, 2), "rate": round(paired.mean_b, 2),
            "reference_count": int(sum(a for a, _ in pairs)), "count": int(sum(b for _, b in pairs)),
            "delta": delta, "rule": RULES[name].format(margin=margin), **extra}


def server_criterion(server: dict | None, skipped: str | None = None) -> dict:
    """The llama-server comparison (ship/gate_server.py's result) as a criterion."""
    if server is None or "skipped" in server:
        return {"name": "server", "passed": None, "skipped": skipped or (server or {}).get("skipped", "not run"),
                "rule": RULES["server"]}
    if "failed" in server:
        return {"name": "server", "passed": False, "rule": RULES["server"], **server}
    return {"name": "server", "passed": not server["beyond_noise"], "rule": RULES["server"], **server}


def judge(reference: list[dict], scores: list[dict], reference_summaries: list[str], summaries: list[str],
          criteria: tuple[dict, ...] = ()) -> dict:
    """ΔROUGE-L, identical summaries, every criterion and the verdict."""
    rouge = rouge_criterion(reference, scores)
    every = [rouge, *criteria]
    failed = [c["name"] for c in every if c["passed"] is False]
    identical = sum(a == b for a, b in zip(reference_summaries, summaries))
    return {"delta_rougeL": rouge["delta"], "identical": identical,
            "identical_share": round(identical / len(summaries), 4) if summaries else None,
            "criteria": every, "failed": failed, "verdict": "hold" if failed else "ship"}


def smallest_shipping(rows: list[dict]) -> dict | None:
    shipping = [r for r in rows if r.get("verdict") == "ship"]
    return min(shipping, key=lambda r: r["bytes"]) if shipping else None


def _criterion_reason(criterion: dict) -> str:
    d = criterion.get("delta") or {}
    if criterion["name"] == "rougeL":
        return f"ROUGE-L {d['mean']:+.2f}, 95% CI [{d['low']:+.2f}, {d['high']:+.2f}]"
    if criterion["name"] == "server" and "failed" in criterion:
        return criterion["failed"]
    if criterion["name"] == "server":
        first = criterion.get("first_difference") or {}
        return (f"llama-server differs from the in-process backend beyond batch noise on "
                f"{len(criterion['beyond_noise'])} row(s), first {first.get('id')}")
    what = "unsupported mentions" if criterion["name"] == "unsupported_mentions" else "runaway summaries"
    return (f"{what} {criterion['rate']:.0f}% vs {criterion['reference_rate']:.0f}%, Δ CI upper bound "
            f"{d['high']:+.1f} > +{criterion['margin']:g} points")


def hold_reason(row: dict) -> str:
    """Why an artifact's row does not ship, in a few words."""
    if row["verdict"] == "not run":
        return f"{row['label']} was not run ({row['why']})"
    failed = [c for c in row.get("criteria", []) if c["passed"] is False]
    if not failed:   # a verdict set from outside the criteria
        d = row["delta_rougeL"]
        return f"{row['label']} holds (ROUGE-L {d['mean']:+.2f}, 95% CI [{d['low']:+.2f}, {d['high']:+.2f}])"
    return f"{row['label']} holds ({'; '.join(_criterion_reason(c) for c in failed)})"
