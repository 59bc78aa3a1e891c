"""Summary-quality metrics from the field's libraries (never `evaluate.load`, which needs the Hub).

ROUGE comes from rouge-score with `use_stemmer=True`, reported as F1 x 100. ROUGE-Lsum needs
one sentence per line; sentences are split with a regular expression, because nltk's punkt
data is not available offline.
"""
from __future__ import annotations

import re

from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9#])")


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum."""
    lines = [s.strip() for part in text.strip().split("\n") for s in _SENTENCE_END.split(part)]
    return "\n".join(s for s in lines if s)


def rouge_per_sample(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-sample ROUGE-1/2/L/Lsum F1 on the 0-100 scale."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    rows = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        rows.append({key: scores[key].fmeasure * 100 for key in ROUGE_KEYS})
    return rows


def mean_scores(rows: list[dict], keys=ROUGE_KEYS) -> dict:
    """Average of each key over the rows (0.0 for no rows)."""
    return {key: (sum(r[key] for r in rows) / len(rows) if rows else 0.0) for key in keys}
