"""Consensus decoding's choice (minimum Bayes risk; DECODING=mbr): which of a row's candidates
becomes its summary.

The engine (engine/generation.py) generates each row's candidates: the greedy summary first, then
MBR_SAMPLES seeded samples. `choose_rows` (the engine's `chooser`) picks one per row:

1. MBR_FAITHFUL: candidates that the shipped unsupported-mention check flags (a name, number,
   time or amount the dialogue does not contain: quality/faithfulness.py `check_summary`) are
   dropped first; when every candidate is flagged, all are kept. The check runs only where it was
   validated (dialogues up to faithfulness.VALIDATED_MAX_WORDS words); elsewhere the row counts
   as unchecked.
2. Each remaining candidate is scored against every other remaining candidate with MBR_UTILITY
   (candidate as hypothesis, the other as pseudo-reference): `rougeL` (rouge-score ROUGE-L F1,
   stemmed), `chrf` (sacrebleu chrF), `minilm` (cosine of all-MiniLM-L6-v2 embeddings,
   quality/encoder.py). The candidate with the highest mean agreement wins; ties go to the greedy
   summary, then to the lowest index.

With one sample and a symmetric utility (rougeL, minilm) both candidates have the same agreement,
so MBR returns the greedy summary: MBR_SAMPLES=1 equals greedy decoding (chrF is not symmetric).
(Freitag et al. 2022, "High Quality Rather than High Model Probability"; Bertsch et al. 2023,
"It's MBR All the Way Down".)
"""
from __future__ import annotations

import functools

import numpy as np

from finetuneflow.contract.decoding import MBR_UTILITIES, Mbr
from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import Choice

TIE = 1e-9          # agreements this close are a tie
CHECK = "unsupported_mentions"


class _TokenizeOnce:
    """rouge-score's own tokenizer (lower case, Porter stems), each candidate of a row tokenized once
    instead of once per pair."""

    def __init__(self):
        from rouge_score.tokenizers import DefaultTokenizer
        self.inner, self.seen = DefaultTokenizer(use_stemmer=True), {}

    def tokenize(self, text: str) -> list[str]:
        if text not in self.seen:
            self.seen[text] = self.inner.tokenize(text)
        return self.seen[text]


def _rouge():
    """A ROUGE-L scorer for one row's candidates."""
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_TokenizeOnce())


@functools.lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF
    return CHRF()


@functools.lru_cache(maxsize=2)
def sentence_encoder(setting: str | None = None):
    """The MiniLM encoder for MBR_UTILITY=minilm, loaded once; one line when it is not installed."""
    from finetuneflow.quality.encoder import HOW_TO_ENABLE, load_encoder
    encoder, note = load_encoder(setting)
    if encoder is None:
        raise UserError(f"MBR_UTILITY=minilm needs the sentence encoder ({note}); {HOW_TO_ENABLE}, or use "
                        f"--mbr_utility=rougeL")
    return encoder


def agreement(candidates: list[str], utility: str) -> np.ndarray:
    """[i, j]: the utility of candidate i against candidate j as its reference (0..1)."""
    n = len(candidates)
    matrix = np.zeros((n, n), dtype=np.float64)
    if utility == "minilm":
        vectors = sentence_encoder().encode(candidates).astype(np.float64)
        matrix = vectors @ vectors.T
        return (matrix + matrix.T) / 2        # exactly symmetric (the product's two halves may differ in the last bit)
    rouge = _rouge() if utility == "rougeL" else None
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if utility == "rougeL":
                if j < i:
                    matrix[i, j] = matrix[j, i]  # F1 is symmetric
                    continue
                matrix[i, j] = rouge.score(candidates[j], candidates[i])["rougeL"].fmeasure
            elif utility == "chrf":
                matrix[i, j] = _chrf().sentence_score(candidates[i], [candidates[j]]).score / 100
            else:
                raise UserError(f"MBR_UTILITY={utility!r} is not one of {', '.join(MBR_UTILITIES)}")
    return matrix


def flagged(candidates: list[str], source: str) -> list[bool] | None:
    """Which candidates the shipped unsupported-mention check flags against `source`; None when the
    check is not validated for a text this long."""
    from finetuneflow.quality import faithfulness as F
    if CHECK not in F.shipped_checks(len(source.split())):
        return None
    return [bool(F.check_summary(c, source, checks=(CHECK,)).flags.get(CHECK)) for c in candidates]


def choose(candidates: list[str], source: str, utility: str = "rougeL", faithful: bool = True) -> Choice:
    """One row's choice (see the module doc); candidates[0] is the greedy summary."""
    flags = flagged(candidates, source) if faithful else None
    kept = list(range(len(candidates)))
    all_flagged = False
    if flags is not None:
        clean = [i for i in kept if not flags[i]]
        all_flagged = not clean
        kept = clean or kept
    dropped = len(candidates) - len(kept)
    if len(kept) == 1:
        return Choice(kept[0], dropped, all_flagged, flags is not None)
    matrix = agreement([candidates[i] for i in kept], utility)
    means = (matrix.sum(axis=1)) / (len(kept) - 1)
    best = means.max()
    tied = [kept[k] for k in range(len(kept)) if means[k] >= best - TIE]
    return Choice(0 if 0 in tied else min(tied), dropped, all_flagged, flags is not None)


def choose_rows(mbr: Mbr, sources: list[str], candidates: list[list[str]]) -> list[Choice]:
    """The engine's chooser: one Choice per row (`sources`: the text each row summarizes)."""
    return [choose(row, source, mbr.utility, mbr.faithful) for row, source in zip(candidates, sources)]


def check_utility(utility: str | None) -> None:
    """Before any work: MBR_UTILITY=minilm needs the encoder installed (one line otherwise)."""
    if utility == "minilm":
        from finetuneflow.quality.encoder import HOW_TO_ENABLE, find_encoder
        folder, note = find_encoder(None)
        if folder is None:
            raise UserError(f"MBR_UTILITY=minilm needs the sentence encoder ({note}); {HOW_TO_ENABLE}, or use "
                            f"--mbr_utility=rougeL")
