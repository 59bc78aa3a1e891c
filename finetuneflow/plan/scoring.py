"""Ranking the benchmark rows: the composite score, the Pareto front, the order and the verdict.

Composite score (model rows only; baselines and failed models get none), min-max normalised
over the successful models of the run (a normalised value is 1.0 when all models tie):

    quality   = (ROUGE-L - min ROUGE-L) / (max ROUGE-L - min ROUGE-L)
    speed     = (log10 samples/s - min) / (max - min)     # log: a 2x speed-up counts the same anywhere
    composite = (QUALITY_WEIGHT * quality + SPEED_WEIGHT * speed) / (QUALITY_WEIGHT + SPEED_WEIGHT)

The Pareto front holds the models that no other model beats on both ROUGE-L and samples/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from finetuneflow.contract.errors import UserError


@dataclass(frozen=True)
class Weights:
    """QUALITY_WEIGHT and SPEED_WEIGHT: each >= 0, not both 0."""
    quality: float = 0.7
    speed: float = 0.3

    def __post_init__(self):
        if not (math.isfinite(self.quality) and math.isfinite(self.speed)) or self.quality < 0 or self.speed < 0 \
                or self.quality + self.speed <= 0:
            raise UserError(f"QUALITY_WEIGHT={self.quality:g} and SPEED_WEIGHT={self.speed:g}: both must be >= 0 and "
                            f"not both 0 (the composite divides by their sum); e.g. --quality_weight=0.7 "
                            f"--speed_weight=0.3")


def _minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [1.0 if high == low else (v - low) / (high - low) for v in values]


def is_candidate(row: dict) -> bool:
    return row.get("kind") == "model" and row.get("status") == "ok" and bool(row.get("samples_per_s"))


def is_reference(row: dict) -> bool:
    return row.get("kind") == "reference" and row.get("status") == "ok"


def add_composite(rows: list[dict], weights: Weights, quality_key: str = "rougeL",
                  speed_key: str = "samples_per_s") -> None:
    """Set quality_norm, speed_norm, composite and pareto on the candidate rows (formula above)."""
    quality_weight, speed_weight = weights.quality, weights.speed
    candidates = [r for r in rows if is_candidate(r)]
    if not candidates:
        return
    quality = _minmax([float(r[quality_key]) for r in candidates])
    speed = _minmax([math.log10(float(r[speed_key])) for r in candidates])
    for row, q, s in zip(candidates, quality, speed):
        row["quality_norm"], row["speed_norm"] = round(q, 4), round(s, 4)
        row["composite"] = round((quality_weight * q + speed_weight * s) / (quality_weight + speed_weight), 4)
    for row in candidates:
        row["pareto"] = not any(
            o is not row and o[quality_key] >= row[quality_key] and o[speed_key] >= row[speed_key]
            and (o[quality_key] > row[quality_key] or o[speed_key] > row[speed_key]) for o in candidates)


def formula_text(weights: Weights) -> str:
    total = weights.quality + weights.speed
    text = f"{weights.quality:g} x minmax(ROUGE-L) + {weights.speed:g} x minmax(log10 samples/s)"
    return (text if total == 1 else f"({text}) / {total:g}") + ", min-max over the successful models of the run"


def order_rows(rows: list[dict]) -> list[dict]:
    """Models by composite (best first), then reference baselines by ROUGE-L, then failures; rank 1..n for models."""
    models = sorted([r for r in rows if is_candidate(r)], key=lambda r: (-r["composite"], -r["rougeL"]))
    references = sorted([r for r in rows if is_reference(r)], key=lambda r: -r["rougeL"])
    placed = {id(r) for r in models + references}
    failed = [r for r in rows if id(r) not in placed]
    for i, row in enumerate(models, 1):
        row["rank"] = i
    return models + references + failed


def explain_winner(rows: list[dict], weights: Weights) -> str:
    """One paragraph: the winner and why (composite parts, best quality, fastest, the best
    baseline it beats or not) and the Pareto front. `rows` come from order_rows."""
    models = [r for r in rows if is_candidate(r)]
    references = [r for r in rows if is_reference(r)]
    if not models:
        return "no model produced results" + ("; only reference baselines ran" if references else "")
    win = models[0]
    best_q = max(models, key=lambda r: r["rougeL"])
    fastest = max(models, key=lambda r: r["samples_per_s"])
    parts = [f"winner: {win['model']} (composite {win['composite']:.3f} = {weights.quality:g} x quality "
             f"{win['quality_norm']:.2f} + {weights.speed:g} x speed {win['speed_norm']:.2f}, normalised)",
             f"ROUGE-L {win['rougeL']:.2f}" + (" (the best)" if best_q is win else
                                              f" (best: {best_q['model']} {best_q['rougeL']:.2f})"),
             f"{win['samples_per_s']:.3g} samples/s" + (" (the fastest)" if fastest is win else
                                                      f" (fastest: {fastest['model']} {fastest['samples_per_s']:.3g})")]
    if references:
        ref = max(references, key=lambda r: r["rougeL"])
        gap = win["rougeL"] - ref["rougeL"]
        parts.append(f"{'beats' if gap > 0 else 'does NOT beat'} the best reference baseline {ref['model']} "
                     f"(ROUGE-L {ref['rougeL']:.2f}): {gap:+.2f}")
    front = [r["model"] for r in models if r.get("pareto")]
    parts.append(f"Pareto front (quality vs speed): {', '.join(front)}")
    return "; ".join(parts)
