"""Which evaluated checkpoint is the run's adapter (`--select_on`), decided again after every
evaluation from the trainer's log history (so a resumed run decides exactly as an uninterrupted one).

Only evaluations at step > 0 are candidates: the zero-shot evaluation (EVAL_ON_START) is a
baseline with no checkpoint behind it.

* `rougeL` (default): the checkpoint with the highest validation ROUGE-L; on a tie the earliest.
  (transformers' own rule, minus the zero-shot evaluation.)
* `rougeL_faithful`: let r* be the lowest unsupported-mention rate of all checkpoints evaluated so
  far and δ = FAITHFULNESS_MARGIN. The eligible checkpoints are those with rate <= r* + δ; the best
  is the eligible one with the highest ROUGE-L (tie: lower rate, then the earliest). Because r*
  can only fall as evaluations come in, a checkpoint that is eligible now may drop out later, and
  the best may then move to an EARLIER checkpoint: so every eligible checkpoint that no other
  eligible one beats on both ROUGE-L and rate (the Pareto front; a beaten one can never become the
  best) is kept on disk until it drops out, beside the SAVE_TOTAL_LIMIT newest. Checkpoints whose
  rate could not be computed (no readable summary) are never eligible; when no checkpoint has a
  rate, the rule is `rougeL` and the note says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

RULES = ("rougeL", "rougeL_faithful")
RULE_TEXT = {
    "rougeL": "the checkpoint (step > 0) with the highest validation ROUGE-L; the earliest on a tie",
    "rougeL_faithful": "r* = the lowest unsupported-mention rate of the checkpoints (step > 0) evaluated so far; "
                       "eligible = checkpoints with rate <= r* + FAITHFULNESS_MARGIN; best = the eligible one with "
                       "the highest ROUGE-L (tie: lower rate, then earlier); decided again after every evaluation, "
                       "so the best can move back to an earlier, still-kept checkpoint when r* falls",
}
RATE_METRIC = "eval_unsupported_mention_rate"
TOLERANCE = 1e-12


@dataclass(frozen=True)
class Evaluation:
    step: int
    rougeL: float
    rate: float | None = None


@dataclass
class Selection:
    best_step: int | None
    best_rougeL: float | None
    keep: set[int] = field(default_factory=set)     # checkpoints that are or may become the best
    threshold: float | None = None                  # r* + δ (rougeL_faithful)
    eligible: list[int] = field(default_factory=list)
    note: str = ""


def evaluations(log_history: list[dict]) -> list[Evaluation]:
    """One Evaluation per evaluated step (the last log entry of a step wins)."""
    by_step = {}
    for entry in log_history:
        if "eval_rougeL" in entry and entry.get("step") is not None:
            by_step[int(entry["step"])] = Evaluation(int(entry["step"]), float(entry["eval_rougeL"]),
                                                     entry.get(RATE_METRIC))
    return [by_step[step] for step in sorted(by_step)]


def _best_by_rouge(candidates: list[Evaluation]) -> Evaluation:
    return max(candidates, key=lambda e: (e.rougeL, -(e.rate if e.rate is not None else 0.0), -e.step))


def _pareto(eligible: list[Evaluation]) -> set[int]:
    def beaten(e: Evaluation) -> bool:
        return any(o is not e and o.rougeL >= e.rougeL and o.rate <= e.rate and (o.rougeL > e.rougeL or o.rate < e.rate)
                   for o in eligible)
    return {e.step for e in eligible if not beaten(e)}


def select(history: list[Evaluation], rule: str = "rougeL", margin: float = 0.05) -> Selection:
    """The best checkpoint so far under `rule` (see the module docstring)."""
    checkpoints = [e for e in history if e.step > 0]
    if not checkpoints:
        return Selection(None, None, note="no checkpoint evaluated yet")
    if rule == "rougeL_faithful":
        rated = [e for e in checkpoints if e.rate is not None]
        if rated:
            lowest = min(e.rate for e in rated)
            threshold = lowest + margin
            eligible = [e for e in rated if e.rate <= threshold + TOLERANCE]
            best = _best_by_rouge(eligible)
            return Selection(best.step, best.rougeL, _pareto(eligible) | {best.step}, threshold,
                             [e.step for e in eligible],
                             f"lowest unsupported-mention rate {lowest:.3f} + margin {margin:g}: "
                             f"{len(eligible)} of {len(checkpoints)} checkpoints eligible")
        note = "no checkpoint has an unsupported-mention rate (no readable summaries): selected on ROUGE-L"
    else:
        note = ""
    best = max(checkpoints, key=lambda e: (e.rougeL, -e.step))
    return Selection(best.step, best.rougeL, {best.step}, note=note)
