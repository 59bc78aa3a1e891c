"""Summary-quality metrics from the field's libraries (never `evaluate.load`, which needs the Hub).

Every score is on the 0-100 scale.

* ROUGE-1/2/L/Lsum: rouge-score with `use_stemmer=True`, F1 x 100, averaged over samples (the
  number papers and the seed report) and as rouge-score's bootstrap aggregate (mid, low, high).
  ROUGE-Lsum needs one sentence per line; `split_sentences` does that with a regular expression
  that knows common abbreviations ("Mr.", "e.g."), because nltk's punkt data is not available
  offline.
* BERTScore F1: quality/bertscore.py (`bertscore`, `BertScoreResult` and `DEFAULT_BERTSCORE_MODEL`
  are importable from here too).
* BLEU and chrF: sacreBLEU corpus scores with their signatures (per sample too, for the tables).
* Several references per sample (`rouge_multi`, `MULTI_REFERENCE_RULE`): ROUGE's maximum over the
  references with the mean beside it; BLEU/chrF with sacreBLEU's multi-reference support.
* Length statistics, failure buckets (rules in `BUCKET_RULES`) and a paired bootstrap for the
  difference between two systems on the same samples.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from rouge_score import rouge_scorer, scoring

from finetuneflow.quality.bertscore import DEFAULT_BERTSCORE_MODEL as DEFAULT_BERTSCORE_MODEL
from finetuneflow.quality.bertscore import BertScoreResult as BertScoreResult
from finetuneflow.quality.bertscore import bertscore as bertscore

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# --- sentence splitting -------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9#])")
# Abbreviations that never end a sentence: titles and Latin shorthands. Words that often do end
# one ("etc.", "p.m.", "U.S.") are left out on purpose: splitting there is the better guess.
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "rev", "gen", "col", "capt",
    "lt", "sgt", "gov", "sen", "rep", "hon", "messrs", "mme", "mlle", "e.g", "i.e", "cf", "vs",
    "approx", "no", "nos", "vol", "fig", "dept", "ca",
})
_LAST_WORD = re.compile(r"(\S+)\.[\"')\]]*$")


def _ends_with_abbreviation(piece: str) -> bool:
    match = _LAST_WORD.search(piece)
    if not match:
        return False
    word = match.group(1).lstrip("\"'([").lower()
    # A single capital letter is an initial ("J. Smith"), not the end of a sentence.
    return word in ABBREVIATIONS or (len(match.group(1)) == 1 and match.group(1).isupper())


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum. Existing newlines are kept as boundaries; a period
    after an abbreviation ("Mr.", "Dr.", "e.g.") or an initial ("J.") does not end a sentence."""
    lines: list[str] = []
    for part in text.strip().split("\n"):
        pieces = _SENTENCE_END.split(part)
        merged: list[str] = []
        for piece in pieces:
            if merged and _ends_with_abbreviation(merged[-1]):
                merged[-1] = f"{merged[-1]} {piece}"
            else:
                merged.append(piece)
        lines += [s.strip() for s in merged]
    return "\n".join(s for s in lines if s)


# --- ROUGE ----------------------------------------------------------------------------------------
def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, scoring.Score]]:
    """rouge-score's per-sample Score tuples (precision, recall, F1 on the 0-1 scale)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    return [scorer.score(split_sentences(reference), split_sentences(prediction))
            for prediction, reference in zip(predictions, references)]


def rouge_f1(scores: list[dict[str, scoring.Score]]) -> list[dict]:
    return [{key: s[key].fmeasure * 100 for key in ROUGE_KEYS} for s in scores]


def rouge_per_sample(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-sample ROUGE-1/2/L/Lsum F1 on the 0-100 scale."""
    return rouge_f1(rouge_scores(predictions, references))


MULTI_REFERENCE_RULE = ("several references: rouge1..rougeLsum are the maximum F1 over the references, "
                        "rouge1_mean..rougeLsum_mean the mean over them; BLEU and chrF use "
                        "sacreBLEU's multi-reference scoring")


def rouge_multi(predictions: list[str], references: list[list[str]]) -> tuple[list[dict], list[dict]]:
    """Per sample against several references: ({key: max F1 x 100}, {key_mean: mean F1 x 100})."""
    best, mean = [], []
    for prediction, refs in zip(predictions, references):
        scored = rouge_per_sample([prediction] * len(refs), list(refs))
        best.append({key: max(s[key] for s in scored) for key in ROUGE_KEYS})
        mean.append({f"{key}_mean": sum(s[key] for s in scored) / len(scored) for key in ROUGE_KEYS})
    return best, mean


def best_reference_scores(predictions: list[str], references: list[list[str]]) -> list[dict[str, scoring.Score]]:
    """rouge-score's Score tuples against each sample's best reference per key (the max F1), for
    the bootstrap aggregate."""
    out = []
    for prediction, refs in zip(predictions, references):
        scored = rouge_scores([prediction] * len(refs), list(refs))
        out.append({key: max((s[key] for s in scored), key=lambda score: score.fmeasure) for key in ROUGE_KEYS})
    return out


def mean_scores(rows: list[dict], keys=ROUGE_KEYS) -> dict:
    """Average of each key over the rows (0.0 for no rows)."""
    return {key: (sum(r[key] for r in rows) / len(rows) if rows else 0.0) for key in keys}


def rouge_bootstrap(scores: list[dict[str, scoring.Score]], n_samples: int = 1000,
                    confidence: float = 0.95, seed: int = 42) -> dict:
    """rouge-score's BootstrapAggregator over per-sample scores: {key: {low, mid, high}} of F1 x 100.

    The aggregator draws from numpy's global generator; it is seeded here (and restored after)
    so the interval is reproducible."""
    if not scores:
        return {key: {"low": 0.0, "mid": 0.0, "high": 0.0} for key in ROUGE_KEYS}
    aggregator = scoring.BootstrapAggregator(confidence_interval=confidence, n_samples=n_samples)
    for sample in scores:
        aggregator.add_scores(sample)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {key: {part: float(getattr(result[key], part).fmeasure * 100) for part in ("low", "mid", "high")}
            for key in ROUGE_KEYS}


# --- sacreBLEU ------------------------------------------------------------------------------------
def _streams(references: list) -> list[list[str]]:
    """sacreBLEU's reference streams: one per reference (references[i]: a string, or a list of
    one sample's references)."""
    if not references or isinstance(references[0], str):
        return [list(references)]
    count = len(references[0])
    if any(len(refs) != count for refs in references):
        raise ValueError("every sample needs the same number of references")
    return [[refs[k] for refs in references] for k in range(count)]


def corpus_bleu_chrf(predictions: list[str], references: list) -> dict:
    """sacreBLEU corpus BLEU and chrF (0-100) with their signatures (default 13a tokenisation);
    `references[i]` a string, or a list of references (sacreBLEU's multi-reference scoring)."""
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    if not predictions:
        return {"bleu": 0.0, "bleu_signature": str(bleu.get_signature()), "chrf": 0.0,
                "chrf_signature": str(chrf.get_signature())}
    bleu_score = bleu.corpus_score(predictions, _streams(references))
    chrf_score = chrf.corpus_score(predictions, _streams(references))
    return {"bleu": float(bleu_score.score), "bleu_signature": str(bleu.get_signature()),
            "chrf": float(chrf_score.score), "chrf_signature": str(chrf.get_signature())}


def sentence_bleu_chrf(predictions: list[str], references: list) -> list[dict]:
    """Per-sample sentence BLEU (effective order, as sacreBLEU recommends) and chrF; a sample's
    reference may be a list of references."""
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(effective_order=True), CHRF()
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    return [{"bleu": float(bleu.sentence_score(p, r).score), "chrf": float(chrf.sentence_score(p, r).score)}
            for p, r in zip(predictions, refs)]


# --- lengths --------------------------------------------------------------------------------------
def words(text: str) -> int:
    return len(text.split())


def length_row(prediction: str, reference: str, dialogue: str | None) -> dict:
    """Words of prediction/reference/dialogue, prediction/reference ratio and compression
    (prediction words / dialogue words; None without a dialogue)."""
    p, r = words(prediction), words(reference)
    d = words(dialogue) if dialogue else None
    return {"pred_words": p, "ref_words": r, "dialogue_words": d,
            "len_ratio": p / r if r else None, "compression": p / d if d else None}


def length_summary(rows: list[dict]) -> dict:
    """Mean and median of each length column over the rows that have it."""
    out = {}
    for key in ("pred_words", "ref_words", "dialogue_words", "len_ratio", "compression"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = {"mean": float(np.mean(values)), "median": float(np.median(values))} if values else None
    return out


# --- failure buckets ------------------------------------------------------------------------------
COPY_NGRAM = 3                # word n-gram size for the copy rule
COPY_SHARE = 0.8              # share of the prediction's n-grams found in the dialogue
COPY_MIN_WORDS = 8            # shorter predictions are never called copies
REPEAT_NGRAM = 3              # word n-gram size for the repetition rule
REPEAT_COUNT = 3              # one n-gram this many times ...
REPEAT_SHARE = 0.25           # ... or this share of n-gram occurrences are repeats
REPEAT_MIN_NGRAMS = 4
TOO_SHORT = 0.5               # prediction words / reference words below this
TOO_LONG = 2.0                # ... above this

BUCKET_RULES = {
    "empty": "the prediction has no letters or digits",
    "speaker_tags": "the prediction contains a dialogue turn marker: '#PersonN#:', 'Speaker X:', or a "
                    "speaker label of this dialogue followed by ':' ('Amanda:'); or '#PersonN#' tags "
                    "when the reference uses none (DialogSum references do use them)",
    "copied_dialogue": f"at least {COPY_SHARE:.0%} of the prediction's word {COPY_NGRAM}-grams occur verbatim "
                       f"in the dialogue (lower-cased; predictions of {COPY_MIN_WORDS}+ words)",
    "repetition": f"one word {REPEAT_NGRAM}-gram occurs {REPEAT_COUNT}+ times, or at least {REPEAT_SHARE:.0%} "
                  f"of the {REPEAT_NGRAM}-gram occurrences are repeats "
                  f"(with {REPEAT_MIN_NGRAMS}+ {REPEAT_NGRAM}-grams)",
    "unsupported_names": "a capitalised word (capital then lower-case letter) that does not start a sentence "
                         "appears nowhere in the dialogue (case-insensitive): a possibly hallucinated name",
    "too_short": f"prediction words < {TOO_SHORT} x reference words",
    "too_long": f"prediction words > {TOO_LONG} x reference words",
    "truncated_input": "the dialogue did not fit the model's input and was cut (from the eval's record, "
                       "or estimated from the dialogue's length when there is none)",
}
BUCKETS = tuple(BUCKET_RULES)   # priority order for the one `bucket` label per sample
OK_BUCKET = "ok"

_WORD = re.compile(r"[a-z0-9']+")
_HAS_TEXT = re.compile(r"\w")
_TURN_MARKER = re.compile(r"#\s*Person\s*\d+\s*#\s*:|\bSpeaker\s+[A-Z]\b\s*:|\bPerson\d+\s*:")
_PERSON_TAG = re.compile(r"#\s*Person\s*\d+\s*#")
_SPEAKER_LABEL = re.compile(r"^\s*([^\n:#]{1,30}?)\s*:", re.MULTILINE)
_CAPITALISED = re.compile(r"\b[A-Z][a-z][a-zA-Z]*(?:'s)?\b")   # "Anna", "McDonald"; not "TV" or "OK"
_SENTENCE_START = re.compile(r"(^|[.!?:;]\s+|\n\s*|#\s+|[\"(]\s*)$")
_NAME_STOPWORDS = frozenset({"i", "i'm", "i've", "i'll", "i'd", "ok", "okay", "tv", "person", "speaker"})


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def copy_share(prediction: str, dialogue: str, n: int = COPY_NGRAM) -> float | None:
    """Share of the prediction's word n-grams that occur in the dialogue (None when too short)."""
    pred = _ngrams(_WORD.findall(prediction.lower()), n)
    if not pred:
        return None
    source = set(_ngrams(_WORD.findall(dialogue.lower()), n))
    return sum(g in source for g in pred) / len(pred)


def repetition(prediction: str, n: int = REPEAT_NGRAM) -> tuple[int, float]:
    """(highest count of one word n-gram, share of n-gram occurrences that repeat an earlier one)."""
    grams = _ngrams(_WORD.findall(prediction.lower()), n)
    if not grams:
        return 0, 0.0
    counts = Counter(grams)
    return max(counts.values()), 1 - len(counts) / len(grams)


def speaker_labels(dialogue: str) -> set[str]:
    """Labels that start turns in the dialogue ('Amanda', 'Speaker A', '#Person1#' is handled apart)."""
    labels = {m.group(1).strip() for m in _SPEAKER_LABEL.finditer(dialogue)}
    return {label for label in labels if label and len(label.split()) <= 3}


def unsupported_names(prediction: str, dialogue: str) -> list[str]:
    """Capitalised words of the prediction that are not sentence-initial and not in the dialogue."""
    known = set(_WORD.findall(dialogue.lower()))
    found = []
    for match in _CAPITALISED.finditer(prediction):
        before = prediction[:match.start()]
        if _SENTENCE_START.search(before):
            continue
        word = match.group(0)
        base = word[:-2] if word.endswith("'s") else word
        if base.lower() in _NAME_STOPWORDS or base.lower() in known or word.lower() in known:
            continue
        if base not in found:
            found.append(base)
    return found


def failure_flags(prediction: str, reference: str, dialogue: str | None,
                  truncated: bool | None = None) -> dict:
    """Every bucket rule for one sample: {bucket: bool, ..., "names": [...]} (rules: BUCKET_RULES).

    Rules that need the dialogue are False when it is missing; `truncated` None means unknown."""
    empty = not _HAS_TEXT.search(prediction or "")
    pred_words, ref_words = words(prediction), words(reference)
    flags = {"empty": empty}
    tags = bool(_TURN_MARKER.search(prediction))
    if not tags and _PERSON_TAG.search(prediction) and not _PERSON_TAG.search(reference):
        tags = True
    if not tags and dialogue:
        labels = speaker_labels(dialogue)
        tags = any(re.search(rf"(^|[\s\"(]){re.escape(label)}\s*:", prediction) for label in labels)
    flags["speaker_tags"] = tags and not empty
    share = copy_share(prediction, dialogue) if dialogue and pred_words >= COPY_MIN_WORDS else None
    flags["copied_dialogue"] = share is not None and share >= COPY_SHARE
    top, repeated = repetition(prediction)
    n_grams = max(0, len(_WORD.findall(prediction.lower())) - REPEAT_NGRAM + 1)
    flags["repetition"] = top >= REPEAT_COUNT or (n_grams >= REPEAT_MIN_NGRAMS and repeated >= REPEAT_SHARE)
    names = unsupported_names(prediction, dialogue) if dialogue else []
    flags["unsupported_names"] = bool(names)
    flags["too_short"] = not empty and ref_words > 0 and pred_words < TOO_SHORT * ref_words
    flags["too_long"] = ref_words > 0 and pred_words > TOO_LONG * ref_words
    flags["truncated_input"] = bool(truncated)
    flags["names"] = names
    flags["copy_share"] = share
    return flags


def primary_bucket(flags: dict) -> str:
    """The first bucket (in BUCKETS order) whose rule holds, else 'ok'."""
    return next((b for b in BUCKETS if flags.get(b)), OK_BUCKET)


# --- paired bootstrap -----------------------------------------------------------------------------
@dataclass
class PairedResult:
    mean_a: float
    mean_b: float
    difference: float          # mean(b - a)
    low: float
    high: float
    p_value: float             # two-sided, from the bootstrap distribution
    confidence: float
    n: int
    samples: int = field(default=0)

    @property
    def significant(self) -> bool:
        """The confidence interval of the difference excludes 0."""
        return self.low > 0 or self.high < 0

    def statement(self, metric: str, name_a: str, name_b: str, higher_is_better: bool | None = True) -> str:
        """One plain line: the difference, its interval, and whether it is significant. With
        `higher_is_better` None (a length, say) a significant difference is not called better."""
        p = "p<0.001" if self.p_value < 0.001 else f"p={self.p_value:.3f}"
        head = (f"{metric}: {name_b} - {name_a} = {self.difference:+.2f} "
                f"({self.confidence:.0%} CI [{self.low:+.2f}, {self.high:+.2f}], {p})")
        if not self.significant:
            return f"{head}: not significant"
        if higher_is_better is None:
            return f"{head}: significant, {name_b} is {'higher' if self.difference > 0 else 'lower'}"
        better = name_b if (self.difference > 0) == higher_is_better else name_a
        return f"{head}: significant, {better} is better"

    def record(self) -> dict:
        return {"mean_a": self.mean_a, "mean_b": self.mean_b, "difference": self.difference,
                "low": self.low, "high": self.high, "p_value": self.p_value, "confidence": self.confidence,
                "n": self.n, "bootstrap_samples": self.samples, "significant": self.significant}


def paired_bootstrap(a, b, n_samples: int = 1000, confidence: float = 0.95, seed: int = 42) -> PairedResult:
    """Paired bootstrap of mean(b) - mean(a) over the same samples: resample sample indices with
    replacement `n_samples` times; the interval is the percentile interval of the resampled mean
    differences; the p-value is twice the smaller tail share at 0 (capped at 1)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same samples: {a.shape} vs {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("paired bootstrap needs at least one sample")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, n, size=(n_samples, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    p = min(1.0, 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedResult(float(a.mean()), float(b.mean()), float(diff.mean()), float(low), float(high),
                        p, confidence, n, n_samples)
