"""Faithfulness and coverage of dialogue summaries, per sample, on a CPU, without the Hub.

ROUGE rewards a fluent summary that puts words in the wrong mouth or turns "3 pm" into "5 pm".
These checks read a summary against its own dialogue (no reference needed):

* **Unsupported mentions** (`unsupported_*`; quality/faith_mentions.py, faith_numbers.py): names,
  places, dates (capitalised words), numbers, times and amounts of the summary that the dialogue
  does not contain. Normalised: number words and digits ("three" = "3"), times ("3 pm" = "15:00"
  = "three o'clock"), amounts ("$50" = "50 dollars"), plurals and possessives ("Smiths",
  "Tom's"), speaker tags (`#Person1#` is supported only by a dialogue that has it).
  Sentence-initial common words ("Finally", "Both") are not mentions. Spans are character offsets
  into the summary.
* **Speaker attribution** (`misattributed_*`; quality/faith_speakers.py): a clause whose subject is
  one of the dialogue's speakers ("#Person2# agrees to ...", "Tom asks Anna ...") is compared with
  every turn (content words, Porter-stemmed, weighted by how rare they are among the turns); it
  looks misattributed when another speaker's best turn supports it better than any turn of the
  named speaker by at least `ATTRIBUTION_MARGIN` of the clause's content weight. Clauses without
  at least `ATTRIBUTION_MIN_CONTENT` content words are not judged.
* **Support** (`support_*`, `weakest_sentence`; quality/faith_support.py): each summary sentence's
  best cosine similarity to a window of dialogue turns, with a local sentence encoder
  (all-MiniLM-L6-v2, see quality/encoder.py). The weakest sentence is the one a reader should
  check first.
* **Coverage by position** (`coverage_begin/middle/end`, `middle_recall`, `coverage_beyond_limit`;
  quality/faith_support.py): the dialogue is cut into thirds of its words; each content word of
  the summary found in the dialogue counts for the thirds it occurs in, weighted by how specific
  it is to them (a word found in every third counts for none); the shares sum to 1. For a
  dialogue longer than the model's input limit (`input_limit_words`, in whitespace-separated
  WORDS of the dialogue; a rule of thumb for English is 1 token = 0.75 words, so 1,024 BART
  tokens are about 750 words), `middle_recall` is the share of the middle third's key words (the
  `MIDDLE_KEY_WORDS` most frequent content words with at least `MIDDLE_SHARE` of their
  occurrences there) that the summary uses, and `coverage_beyond_limit` the share of the
  summary's positional weight that lies past the limit. A summary of a truncated input draws on
  the beginning only; a chunked one can draw on every third.

Words, speaker tags, turns and the language check are shared by all of them (quality/faith_text.py).

Every check degrades with a reason instead of raising: an empty summary or dialogue, a dialogue
without speaker tags (attribution), text that does not look like English, no encoder (support).

`score_samples()` returns one row per sample (plain numbers, strings, lists, None) and a list of
notes (metrics skipped for every sample, in one line each). `METRIC_COLUMNS` gives each numeric
column's direction for paired bootstrap comparisons; `CHECKS`/`flags()` turn a row into yes/no
checks; `SHIPPED_CHECKS` are the checks the validation benchmark (benchmarks/bench_faithfulness.py)
showed to catch their error (>= 80%) with few false alarms (<= 10%) on human references; the
others are experimental and must stay out of checkpoint selection.

`check_summary(summary, dialogue)` runs only the checks asked for (by default the ones shipped for
a dialogue of that length) on one summary, cheaply enough for every served summary, and returns
their flags with the flagged spans as character offsets into the summary.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from finetuneflow.quality.faith_mentions import name_mentions as name_mentions
from finetuneflow.quality.faith_mentions import unsupported_mentions
from finetuneflow.quality.faith_speakers import misattributions
from finetuneflow.quality.faith_support import SEGMENTS, coverage, dialogue_units, sentence_support
from finetuneflow.quality.faith_text import english_problem, parse_turns
from finetuneflow.quality.metrics import split_sentences

# --- settings -------------------------------------------------------------------------------------
SUPPORT_THRESHOLD = 0.41                  # best window similarity below this: unsupported
#                                           (the 5% quantile of DialogSum dev references)


# The validation benchmark decides this (benchmarks/bench_faithfulness.py, results in
# benchmarks/faithfulness.md): checks that flagged >= 80% of their own corruption with <= 10%
# false alarms on the untouched references of the held-out half of DialogSum dev (rows 250-499).
SHIPPED_CHECKS: tuple[str, ...] = ("unsupported_mentions", "unsupported_sentence")
EXPERIMENTAL_CHECKS: tuple[str, ...] = ("misattribution",)
VALIDATED_MAX_WORDS = 515       # longest validated dialogue (HighlightSum chats; DialogSum dev: 472 words)
VALIDATION = {   # held-out DialogSum dev rows 250-499: (detection of its own corruption, false alarms)
    "unsupported_mentions": {"number_change": 1.000, "name_insert": 1.000, "false_alarms": 0.008},
    "unsupported_sentence": {"sentence_append": 0.844, "false_alarms": 0.060},
    "misattribution": {"speaker_swap": 0.608, "false_alarms": 0.195},
}
VALIDATION_GOAL = {"min_detection": 0.80, "max_false_alarms": 0.10}

# Numeric per-sample columns and their direction (True: higher is better).
METRIC_COLUMNS: dict[str, bool] = {
    "unsupported_rate": False,
    "unsupported_count": False,
    "misattributed_rate": False,
    "support_min": True,
    "support_mean": True,
    "coverage_begin": None,      # a position profile: no better or worse on its own
    "coverage_middle": None,
    "coverage_end": None,
    "middle_recall": True,
    "coverage_beyond_limit": None,
}

CHECKS = {
    "unsupported_mentions": "the summary has at least one name, place, date, number, time or amount "
                            "that the dialogue does not contain (unsupported_count >= 1)",
    "misattribution": "at least one summary sentence attributes to a speaker what another speaker said "
                      "(misattributed_rate > 0)",
    "unsupported_sentence": f"the summary's weakest sentence has a best window similarity below "
                            f"{SUPPORT_THRESHOLD} (support_min < {SUPPORT_THRESHOLD})",
}
CHECK_COLUMNS = {"unsupported_mentions": ("unsupported_rate", "unsupported_count"),
                 "misattribution": ("misattributed_rate",),
                 "unsupported_sentence": ("support_min", "support_mean")}

ENCODER_METRICS = ("support_min", "support_mean", "weakest_sentence")

# --- per sample -----------------------------------------------------------------------------------
class Scored(NamedTuple):
    rows: list[dict]
    notes: list[str]


def _empty_row() -> dict:
    return {"unsupported_rate": None, "unsupported_count": None, "mentions_checked": None, "unsupported_spans": [],
            "misattributed_rate": None, "misattributed_count": None, "attributed_sentences": None,
            "misattributed_examples": [], "support_min": None, "support_mean": None, "weakest_sentence": None,
            "sentence_support": [], **{f"coverage_{s}": None for s in SEGMENTS}, "middle_recall": None,
            "coverage_beyond_limit": None, "dialogue_words": None, "reasons": ""}


def _unscorable(prediction: str, dialogue: str) -> str | None:
    """Why no check can read this summary against this dialogue (None when they can)."""
    if not dialogue.strip():
        return "no dialogue"
    if not re.search(r"\w", prediction):
        return "empty summary"
    return english_problem(prediction + "\n" + dialogue)


def _mention_columns(prediction: str, dialogue: str) -> tuple[dict, list[str]]:
    bad, checked = unsupported_mentions(prediction, dialogue)
    row = {"unsupported_count": len(bad), "mentions_checked": checked, "unsupported_spans": bad}
    if checked:
        return {**row, "unsupported_rate": len(bad) / checked}, []
    return row, ["unsupported_rate: the summary has no names, numbers or times to check"]


def _attribution_columns(prediction: str, turns) -> tuple[dict, list[str]]:
    wrong, judged, why = misattributions(prediction, turns)
    if not judged:
        return {}, [f"misattributed_rate: {why}"]
    return {"misattributed_rate": len(wrong) / judged, "misattributed_count": len(wrong),
            "attributed_sentences": judged, "misattributed_examples": wrong}, []


def _support_columns(prediction: str, turns, encoder) -> dict:
    sentences = [s for s in split_sentences(prediction).split("\n") if re.search(r"\w", s)]
    units = dialogue_units(turns)
    if encoder is None or not sentences or not units:
        return {}
    support = sentence_support(sentences, units, encoder)
    weakest = min(range(len(support)), key=support.__getitem__)
    return {"support_min": support[weakest], "support_mean": sum(support) / len(support),
            "weakest_sentence": sentences[weakest],
            "sentence_support": [{"sentence": s, "support": round(v, 4)} for s, v in zip(sentences, support)]}


def score_sample(prediction: str, dialogue: str, *, encoder=None, input_limit_words: int | None = None) -> dict:
    """Every check for one summary against its dialogue (see the module docstring)."""
    row = _empty_row()
    prediction = prediction if isinstance(prediction, str) else ""
    dialogue = dialogue if isinstance(dialogue, str) else ""
    row["dialogue_words"] = len(dialogue.split())
    problem = _unscorable(prediction, dialogue)
    if problem:
        row["reasons"] = f"all: {problem}"
        return row
    turns = parse_turns(dialogue)
    reasons: list[str] = []
    for columns, why in (_mention_columns(prediction, dialogue), _attribution_columns(prediction, turns),
                         (_support_columns(prediction, turns, encoder), []),
                         coverage(prediction, dialogue, input_limit_words)):
        row.update(columns)
        reasons += why
    row["reasons"] = "; ".join(reasons)
    return row


def score_samples(predictions: list[str], dialogues: list[str], *, encoder=None,
                  input_limit_words: int | None = None) -> Scored:
    """Per-sample faithfulness rows for `predictions` against their `dialogues`, and notes.

    `encoder`: None = the default MiniLM when installed (else the support columns are None and
    one note says how to enable them); "" or False = no encoder; a folder path; or a loaded
    `encoder.SentenceEncoder`. `input_limit_words`: the model's input limit in whitespace words
    of the dialogue (None: middle_recall is not computed)."""
    if len(predictions) != len(dialogues):
        raise ValueError(f"{len(predictions)} predictions but {len(dialogues)} dialogues")
    from finetuneflow.quality.encoder import HOW_TO_ENABLE, load_encoder
    notes: list[str] = []
    loaded, note = load_encoder(encoder)
    if loaded is None:
        enable = "" if "pip install" in note else f"; to enable: {HOW_TO_ENABLE}"
        notes.append(f"skipped {', '.join(ENCODER_METRICS)}: no sentence encoder ({note}){enable}")
    rows = [score_sample(p, d, encoder=loaded, input_limit_words=input_limit_words)
            for p, d in zip(predictions, dialogues)]
    degraded = Counter(r["reasons"].split(":")[1].strip() for r in rows if r["reasons"].startswith("all:"))
    for why, count in degraded.items():
        notes.append(f"{count} of {len(rows)} samples not scored: {why}")
    return Scored(rows, notes)


# --- checks ---------------------------------------------------------------------------------------
def flags(row: dict) -> dict[str, bool | None]:
    """Each check of CHECKS for one row: True (flagged), False, or None (could not be computed)."""
    return {
        "unsupported_mentions": None if row.get("unsupported_count") is None else row["unsupported_count"] >= 1,
        "misattribution": None if row.get("misattributed_rate") is None else row["misattributed_rate"] > 0,
        "unsupported_sentence": None if row.get("support_min") is None else row["support_min"] < SUPPORT_THRESHOLD,
    }


def shipped_checks(dialogue_words: float | None = None) -> tuple[str, ...]:
    """The checks validated for dialogues of this length (whitespace words; e.g. the median of an
    evaluation set). Validation covered chats and dialogues up to VALIDATED_MAX_WORDS words; on
    long meeting transcripts (HighlightSum's AMI meetings, 755+ words) both checks raised too many
    false alarms on human references, so none is shipped there."""
    if dialogue_words is not None and dialogue_words > VALIDATED_MAX_WORDS:
        return ()
    return SHIPPED_CHECKS


def is_shipped(check: str) -> bool:
    """Whether `check` passed the validation (only shipped checks may drive checkpoint selection)."""
    if check not in CHECKS:
        raise KeyError(f"unknown check {check!r}; known: {', '.join(CHECKS)}")
    return check in SHIPPED_CHECKS


def selection_columns(dialogue_words: float | None = None) -> dict[str, bool]:
    """The METRIC_COLUMNS of shipped checks, with their direction: what a trainer may select on
    (none for dialogues longer than VALIDATED_MAX_WORDS, see shipped_checks)."""
    return {col: METRIC_COLUMNS[col] for check in shipped_checks(dialogue_words) for col in CHECK_COLUMNS[check]}


def mean_columns(rows: list[dict]) -> dict[str, dict]:
    """{column: {"mean": mean over the rows that have a value (None if none), "n": how many}}."""
    out = {}
    for column in METRIC_COLUMNS:
        values = [float(r[column]) for r in rows if r.get(column) is not None]
        out[column] = {"mean": sum(values) / len(values) if values else None, "n": len(values)}
    return out


def paired_values(rows_a: list[dict], rows_b: list[dict], column: str) -> tuple[list[float], list[float], int]:
    """(a, b, dropped): the column's values where both versions have one, for
    metrics.paired_bootstrap; `dropped` counts the samples left out (None on either side)."""
    if len(rows_a) != len(rows_b):
        raise ValueError(f"paired values need the same samples: {len(rows_a)} vs {len(rows_b)} rows")
    a, b = [], []
    for ra, rb in zip(rows_a, rows_b):
        if ra.get(column) is not None and rb.get(column) is not None:
            a.append(float(ra[column]))
            b.append(float(rb[column]))
    return a, b, len(rows_a) - len(a)


# --- one summary, its flagged spans ---------------------------------------------------------------
@dataclass(frozen=True)
class FlaggedSpan:
    """A flagged part of a summary: summary[start:end] == text."""
    check: str                 # a key of CHECKS
    start: int
    end: int
    text: str
    why: str                   # a few words for a reader ("name not in the dialogue")


@dataclass
class SummaryChecks:
    flags: dict[str, bool | None]                              # check -> flagged, or None: no answer
    spans: list[FlaggedSpan] = field(default_factory=list)     # in order of `start`
    notes: list[str] = field(default_factory=list)             # why a check gave no answer, or none ran


def check_summary(summary: str, dialogue: str, *, checks: tuple[str, ...] | None = None,
                  encoder=None) -> SummaryChecks:
    """The `checks` (default: those shipped for a dialogue of this length, see shipped_checks) on one
    summary against its dialogue, with the flagged spans as character offsets into the summary.
    Only what those checks need is computed (no coverage); "unsupported_sentence" needs a loaded
    sentence encoder (quality/encoder.load_encoder, loaded once by the caller), else it is None."""
    summary = summary if isinstance(summary, str) else ""
    dialogue = dialogue if isinstance(dialogue, str) else ""
    notes: list[str] = []
    if checks is None:
        checks = shipped_checks(len(dialogue.split()))
        if not checks:
            notes.append(f"no check is validated on dialogues over {VALIDATED_MAX_WORDS} words")
    for check in checks:
        is_shipped(check)    # an unknown name raises KeyError
    problem = _unscorable(summary, dialogue) if checks else None
    if problem:
        return SummaryChecks({c: None for c in checks}, [], notes + [problem])
    row: dict = {}
    if "unsupported_mentions" in checks:
        row.update(_mention_columns(summary, dialogue)[0])
    turns = parse_turns(dialogue) if {"misattribution", "unsupported_sentence"} & set(checks) else []
    if "misattribution" in checks:
        columns, why = _attribution_columns(summary, turns)
        row.update(columns)
        notes += why
    if "unsupported_sentence" in checks:
        row.update(_support_columns(summary, turns, encoder))
        if encoder is None:
            notes.append("unsupported_sentence: no sentence encoder was given")
    flagged = flags(row)
    return SummaryChecks({c: flagged[c] for c in checks}, _flagged_spans(summary, row, flagged), notes)


def _flagged_spans(summary: str, row: dict, flagged: dict) -> list[FlaggedSpan]:
    spans = [FlaggedSpan("unsupported_mentions", b["start"], b["end"], b["text"], f"{b['kind']} not in the dialogue")
             for b in row.get("unsupported_spans", [])]
    for example in row.get("misattributed_examples", []):
        start, end = _locate(summary, example["sentence"])
        spans.append(FlaggedSpan("misattribution", start, end, summary[start:end],
                                 f"{example['said_by']} said this, not {example['named_speaker']}"))
    if flagged.get("unsupported_sentence"):
        start, end = _locate(summary, row["weakest_sentence"])
        spans.append(FlaggedSpan("unsupported_sentence", start, end, summary[start:end],
                                 f"no part of the dialogue says this (support {row['support_min']:.2f} < "
                                 f"{SUPPORT_THRESHOLD})"))
    return sorted(spans, key=lambda s: (s.start, s.end))


def _locate(summary: str, sentence: str) -> tuple[int, int]:
    """Where a sentence of split_sentences(summary) lies in the summary (it may have joined
    whitespace into one space); the whole summary if it cannot be found."""
    match = re.search(r"\s+".join(re.escape(w) for w in sentence.split()), summary)
    return (match.start(), match.end()) if match else (0, len(summary))
