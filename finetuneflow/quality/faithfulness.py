"""Faithfulness and coverage of dialogue summaries, per sample, on a CPU, without the Hub.

ROUGE rewards a fluent summary that puts words in the wrong mouth or turns "3 pm" into "5 pm".
These checks read a summary against its own dialogue (no reference needed):

* **Unsupported mentions** (`unsupported_*`): names, places, dates (capitalised words), numbers,
  times and amounts of the summary that the dialogue does not contain. Normalised: number words
  and digits ("three" = "3"), times ("3 pm" = "15:00" = "three o'clock"), amounts ("$50" = "50
  dollars"), plurals and possessives ("Smiths", "Tom's"), speaker tags (`#Person1#` is supported
  only by a dialogue that has it). Sentence-initial common words ("Finally", "Both") are not
  mentions. Spans are character offsets into the summary.
* **Speaker attribution** (`misattributed_*`): a clause whose subject is one of the dialogue's
  speakers ("#Person2# agrees to ...", "Tom asks Anna ...") is compared with every turn
  (content words, Porter-stemmed, weighted by how rare they are among the turns); it looks
  misattributed when another speaker's best turn supports it better than any turn of the named
  speaker by at least `ATTRIBUTION_MARGIN` of the clause's content weight. Clauses without at
  least `ATTRIBUTION_MIN_CONTENT` content words are not judged.
* **Support** (`support_*`, `weakest_sentence`): each summary sentence's best cosine similarity
  to a window of dialogue turns, with a local sentence encoder (all-MiniLM-L6-v2, see
  quality/encoder.py). The weakest sentence is the one a reader should check first.
* **Coverage by position** (`coverage_begin/middle/end`, `middle_recall`,
  `coverage_beyond_limit`): the dialogue is cut into thirds of its words; each content word of
  the summary found in the dialogue counts for the thirds it occurs in, weighted by how
  specific it is to them (a word found in every third counts for none); the shares sum to 1.
  For a dialogue longer than the model's input limit (`input_limit_words`, in
  whitespace-separated WORDS of the dialogue; a rule of thumb for English is 1 token = 0.75
  words, so 1,024 BART tokens are about 750 words), `middle_recall` is the share of the middle
  third's key words (the `MIDDLE_KEY_WORDS` most frequent content words with at least
  `MIDDLE_SHARE` of their occurrences there) that
  the summary uses, and `coverage_beyond_limit` the share of the summary's positional weight
  that lies past the limit. A summary of a truncated input draws on the beginning only; a
  chunked one can draw on every third.

Every check degrades with a reason instead of raising: an empty summary or dialogue, a dialogue
without speaker tags (attribution), text that does not look like English, no encoder (support).

`score_samples()` returns one row per sample (plain numbers, strings, lists, None) and a list of
notes (metrics skipped for every sample, in one line each). `METRIC_COLUMNS` gives each numeric
column's direction for paired bootstrap comparisons; `CHECKS`/`flags()` turn a row into yes/no
checks; `SHIPPED_CHECKS` are the checks the validation benchmark (benchmarks/bench_faithfulness.py)
showed to catch their error (>= 80%) with few false alarms (<= 10%) on human references; the
others are experimental and must stay out of checkpoint selection.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from finetuneflow.quality.metrics import split_sentences

# --- settings -------------------------------------------------------------------------------------
SEGMENTS = ("begin", "middle", "end")     # coverage by thirds of the dialogue's words
MIDDLE_KEY_WORDS = 20                     # key words of the middle third for middle_recall ...
MIDDLE_SHARE = 0.75                       # ... words with at least this share of their occurrences there
SUPPORT_THRESHOLD = 0.41                  # best window similarity below this: unsupported
#                                           (the 5% quantile of DialogSum dev references)
WINDOW_UNIT_WORDS = 64                    # turns longer than this are cut into pieces of this many words
WINDOW_SPAN = 3                           # windows: each piece, and runs of 2..WINDOW_SPAN consecutive pieces
ATTRIBUTION_MIN_CONTENT = 2               # content words a clause needs to be judged
ATTRIBUTION_MARGIN = 0.30                 # (other speaker's best turn - named speaker's best) / clause weight
ENGLISH_MIN_WORDS = 12                    # below this many words, no language check
ENGLISH_MIN_FUNCTION_SHARE = 0.08         # share of common English function words below this: not English
                                          # (English DialogSum/HighlightSum rows: >= 0.11, 1% quantile 0.24)
ENGLISH_MAX_NON_ASCII = 0.30              # share of non-ASCII letters above this: not English

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

# --- words ----------------------------------------------------------------------------------------
STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before being
below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
each few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more
most mustn't my myself no nor not of off on once only or other ought our ours ourselves out over own same
shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them
themselves then there there's these they they'd they'll they're they've this those through to too under
until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which
while who who's whom why why's will with won't would wouldn't you you'd you'll you're you've your yours
yourself yourselves just now also yes yeah ok okay oh well really s t ll ve re d m don didn doesn isn wasn
aren won wouldn couldn shouldn haven hasn hadn uh um mm hmm get got go going gonna will would shall may might
must can could one thing things lot much many also even still let
""".split())
# Reporting verbs and discourse words that say nothing about what was said (Porter stems).
REPORTING_STEMS = frozenset("""
ask tell say said talk discuss explain answer repli mention inform agre suggest think thought want wonder
inquir offer decid hope feel know describ persuad invit remind agree propos recommend respond call
""".split())
# Capitalised words that start sentences without being names.
COMMON_STARTERS = frozenset("""
a an the this that these those it its he she they we you i his her their our my your there here then
both each every all some many most several few no none either neither one another other others
after before when while since because although though if unless until as so but and or yet also also
finally eventually later earlier afterwards meanwhile due following overall according despite apparently
unfortunately fortunately luckily hopefully currently initially recently originally actually basically
then next first second third last lastly however therefore
thus instead still soon now today tomorrow yesterday tonight once twice again anyway besides otherwise
at in on by for from with without about into during under over through to of between among against
what who whom whose which where why how everyone everybody someone somebody nobody nothing everything
something anyone anything people customers students friends parents children kids staff guests visitors
mr mrs ms dr miss sir madam
""".split())
_ENGLISH_FUNCTION_WORDS = frozenset("""
the a an and to of in is it you i that for on with was this be have are not but what my your we they he she at
so do can if me about there his her will just all no yes would or like from how
""".split())
TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "miss", "sir", "madam", "mister", "st", "mt"})
MONTHS = ("january february march april may june july august september october november december").split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()

_TOKEN = re.compile(r"[a-z]+|\d+")
_TAG = re.compile(r"#\s*Person\s*(\d+)\s*#", re.IGNORECASE)
_LABEL_LINE = re.compile(r"^\s*(#\s*Person\s*\d+\s*#|Speaker\s+[A-Z0-9]{1,3}|[A-Za-z][\w'.\-]*(?: [A-Z][\w'.\-]*){0,2})"
                         r"\s*:\s?(.*)$")
_CAP_WORD = re.compile(r"(?<![\w#])(?:[A-Z][a-z]+(?:[-'][A-Za-z]+)*|[A-Z][a-z]*[A-Z][a-z]+|[A-Z]{2,})"
                       r"(?:'s|’s|s'|’)?(?![\w#])")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*|[\"(]\s*|^\s*[-*]\s*)$")


_STEMMER = None


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    """nltk's Porter stemmer (as rouge-score uses), cached."""
    global _STEMMER
    if _STEMMER is None:
        from nltk.stem.porter import PorterStemmer
        _STEMMER = PorterStemmer()
    return _STEMMER.stem(word)


def _strip_possessive(word: str) -> str:
    word = re.sub(r"'(?:re|ll|ve|d|m)$", "", word.replace("’", "'"), flags=re.IGNORECASE)   # "They're", "Mom'll"
    for suffix in ("'s", "s'", "'"):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            return word[:-len(suffix)] if suffix != "s'" else word[:-1]
    return word


def _word_forms(word: str) -> set[str]:
    """Lower-cased forms a mention is matched by: as is, without possessive, singular, stem."""
    w = _strip_possessive(word.lower())
    forms = {w, _stem(w)}
    if w.endswith("ies") and len(w) > 4:
        forms.add(w[:-3] + "y")
    if w.endswith("es") and len(w) > 3:
        forms.add(w[:-2])
    if w.endswith("s") and len(w) > 2:
        forms.add(w[:-1])
    if w.endswith("an") and len(w) > 5:       # demonyms: "American" ~ "America", "Korean" ~ "Korea"
        forms.add(w[:-1])
    return forms


def _one_edit(a: str, b: str) -> bool:
    """a and b differ by at most one inserted, deleted or replaced letter."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((k for k in range(len(a)) if a[k] != b[k]), len(a))
    return a[i + (len(a) == len(b)):] == b[i + 1:]


def _content_stems(text: str) -> list[str]:
    """Porter stems of the content words (no stop words, no speaker tags), in order."""
    text = _TAG.sub(" ", text.lower().replace("’", "'"))
    return [_stem(t) for t in _TOKEN.findall(text) if t not in STOPWORDS and len(t) > 1 and not t.isdigit()]


# --- numbers --------------------------------------------------------------------------------------
_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())
         if w != "_"}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
_ORDINALS = {"third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10,
             "eleventh": 11, "twelfth": 12, "thirteenth": 13, "fifteenth": 15, "twentieth": 20, "thirtieth": 30,
             "hundredth": 100}
_AMBIGUOUS_ORDINALS = {"first": 1, "second": 2}      # support only: "first" is rarely a number in a summary
_NUMBER_WORD = "|".join(sorted([*_UNITS, *_TENS, *_SCALES, "dozen"], key=len, reverse=True))
_NUMBER_WORDS = re.compile(rf"\b(?:{_NUMBER_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_NUMBER_WORD}))*\b", re.IGNORECASE)
_ORDINAL_WORDS = re.compile(r"\b(" + "|".join([*_ORDINALS, *_AMBIGUOUS_ORDINALS]) + r")\b", re.IGNORECASE)
_AMPM = r"([ap])(?:\s?m\b|\.\s?m\.)"            # "pm", "p m", "p.m.", "p. m."
_TIME_COLON = re.compile(rf"\b(\d{{1,2}})\s?:\s?(\d{{2}})\b(?:\s*{_AMPM})?", re.IGNORECASE)
_TIME_AMPM = re.compile(rf"\b(\d{{1,2}})\s*{_AMPM}", re.IGNORECASE)
_TIME_OCLOCK = re.compile(rf"\b(\d{{1,2}}|{'|'.join(list(_UNITS)[1:13])})\s*o\s?'\s?clock\b", re.IGNORECASE)
_TIME_PAST = re.compile(rf"\b(half|quarter)\s+(past|to|after)\s+(\d{{1,2}}|{'|'.join(list(_UNITS)[1:13])})\b",
                        re.IGNORECASE)
_DIGITS = re.compile(r"(?<![\w.])(\d{1,3}(?:, ?\d{3})+(?!\d)|\d+)(\.\d+)?(st|nd|rd|th|s|k|%)?(?!\w)", re.IGNORECASE)


def _words_value(text: str) -> list[float]:
    """Values of a run of number words: 'twenty-five' -> [25], 'three hundred' -> [300],
    'three thirty' -> [3, 30] (not a compound: two numbers)."""
    values, total, current, last = [], 0, 0, None
    for token in re.findall(r"[a-z]+", text.lower()):
        if token == "and":
            continue
        if token == "dozen":
            current = (current or 1) * 12
            last = "scale"
        elif token in _SCALES:
            scale = _SCALES[token]
            if scale == 100:
                current = (current or 1) * 100
            else:
                total += (current or 1) * scale
                current = 0
            last = "scale"
        elif token in _TENS:
            if last in ("unit", "tens", "teen"):      # "three thirty": a new number
                values.append(total + current)
                total, current = 0, 0
            current += _TENS[token]
            last = "tens"
        elif token in _UNITS:
            if last in ("unit", "teen") or (last == "tens" and _UNITS[token] >= 10):
                values.append(total + current)
                total, current = 0, 0
            current += _UNITS[token]
            last = "teen" if _UNITS[token] >= 10 else "unit"
    values.append(total + current)
    return [float(v) for v in values]


@dataclass
class NumberMention:
    start: int
    end: int
    text: str
    values: tuple[float, ...] = ()             # plain numbers
    times: tuple[tuple[int, int], ...] = ()    # (hour % 12, minute)
    ambiguous: bool = False                    # "one", "first": used as support, never as a mention


def _hour(h: int, ampm: str | None) -> int:
    return h % 12


def number_mentions(text: str) -> list[NumberMention]:
    """Numbers, times and amounts in `text`, speaker tags (#Person1#) excluded, as non-overlapping spans."""
    masked = _TAG.sub(lambda m: " " * len(m.group(0)), text)
    found: list[NumberMention] = []
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e in taken)

    def add(m: NumberMention) -> None:
        if free(m.start, m.end):
            found.append(m)
            taken.append((m.start, m.end))

    for m in _TIME_COLON.finditer(masked):
        h, mi = int(m.group(1)), int(m.group(2))
        if h <= 24 and mi < 60:
            add(NumberMention(m.start(), m.end(), m.group(0), times=((_hour(h, m.group(3)), mi),)))
    for m in _TIME_AMPM.finditer(masked):
        h = int(m.group(1))
        if 0 < h <= 12:
            add(NumberMention(m.start(), m.end(), m.group(0), times=((h % 12, 0),)))
    for m in _TIME_OCLOCK.finditer(masked):
        raw = m.group(1).lower()
        h = int(raw) if raw.isdigit() else _UNITS[raw]
        add(NumberMention(m.start(), m.end(), m.group(0), times=((h % 12, 0),)))
    for m in _TIME_PAST.finditer(masked):
        raw = m.group(3).lower()
        h = int(raw) if raw.isdigit() else _UNITS[raw]
        minute = 30 if m.group(1).lower() == "half" else 15
        if m.group(2).lower() == "to":
            h, minute = h - 1, 45
        add(NumberMention(m.start(), m.end(), m.group(0), times=((h % 12, minute),)))
    for m in _DIGITS.finditer(masked):
        value = float(re.sub(r"[, ]", "", m.group(1)) + (m.group(2) or ""))
        if (m.group(3) or "").lower() == "k":
            value *= 1000
        add(NumberMention(m.start(), m.end(), m.group(0), values=(value,)))
    for m in _NUMBER_WORDS.finditer(masked):
        values = _words_value(m.group(0))
        ambiguous = m.group(0).lower() in ("one", "zero")
        add(NumberMention(m.start(), m.end(), m.group(0), values=tuple(values), ambiguous=ambiguous))
    for m in _ORDINAL_WORDS.finditer(masked):
        word = m.group(1).lower()
        value = _ORDINALS.get(word, _AMBIGUOUS_ORDINALS.get(word))
        add(NumberMention(m.start(), m.end(), m.group(0), values=(float(value),),
                          ambiguous=word in _AMBIGUOUS_ORDINALS))
    return sorted(found, key=lambda m: m.start)


class _NumberIndex:
    """The numbers and times a dialogue supports."""

    def __init__(self, text: str):
        self.values: set[float] = set()
        self.times: set[tuple[int, int]] = set()
        for m in number_mentions(text):
            self.values.update(m.values)
            for h, mi in m.times:
                self.times.add((h, mi))
                self.values.update({float(h), float(h + 12), float(mi)} if mi else {float(h), float(h + 12)})

    def supports(self, m: NumberMention) -> bool:
        for h, mi in m.times:
            if (h, mi) in self.times:
                continue
            hour_ok = float(h) in self.values or float(h + 12) in self.values or (h == 0 and 12.0 in self.values)
            if not (hour_ok and (mi == 0 or float(mi) in self.values)):
                return False
        for v in m.values:
            if v in self.values:
                continue
            if v != int(v):            # "$3.50" from "three fifty"
                whole, cents = int(v), round((v - int(v)) * 100)
                if float(whole) in self.values and float(cents) in self.values:
                    continue
            if v <= 12 and any(h == v % 12 for h, _ in self.times):
                continue
            return False
        return True


# --- dialogue structure ---------------------------------------------------------------------------
@dataclass
class Turn:
    speaker: str | None
    text: str
    word_start: int          # index of the turn's first word among the dialogue's words


def parse_turns(dialogue: str) -> list[Turn]:
    """One Turn per line; 'Label: text' lines name their speaker, other lines continue the previous
    turn's speaker (None before any label)."""
    turns: list[Turn] = []
    words = 0
    for line in dialogue.splitlines():
        if not line.strip():
            continue
        match = _LABEL_LINE.match(line)
        if match and not match.group(1).strip().isdigit():
            label = match.group(1)
            speaker = re.sub(r"\s+", "", label) if label.lstrip().startswith("#") else label.strip()
            text = match.group(2)
        else:
            speaker = turns[-1].speaker if turns else None
            text = line
        turns.append(Turn(speaker, text.strip(), words))
        words += len(line.split())
    return turns


def _normalise_tag(tag: str) -> str:
    m = _TAG.fullmatch(tag.strip())
    return f"#Person{m.group(1)}#" if m else tag.strip()


def speakers_of(turns: list[Turn]) -> list[str]:
    """Speakers in order of first turn."""
    return list(dict.fromkeys(t.speaker for t in turns if t.speaker))


def _english_problem(text: str) -> str | None:
    """Why `text` does not look like English (None when it does or is too short to tell)."""
    letters = [c for c in text if c.isalpha()]
    if letters:
        non_ascii = sum(not c.isascii() for c in letters) / len(letters)
        if non_ascii > ENGLISH_MAX_NON_ASCII:
            return (f"the text does not look like English ({non_ascii:.0%} of its letters are not ASCII); "
                    f"these checks are for English")
    words = re.findall(r"[a-z']+", _TAG.sub(" ", text.lower()))
    if len(words) < ENGLISH_MIN_WORDS:
        return None
    share = sum(w in _ENGLISH_FUNCTION_WORDS for w in words) / len(words)
    if share < ENGLISH_MIN_FUNCTION_SHARE:
        return (f"the text does not look like English (only {share:.0%} of its words are common English "
                f"words); these checks are for English")
    return None


# --- 1. unsupported mentions ----------------------------------------------------------------------
def _is_sentence_start(text: str, start: int) -> bool:
    before = text[:start]
    if not _SENTENCE_START.search(before):
        return False
    previous = re.search(r"(\w+)\.\s+$", before)      # "Mr. Brown", "Dr. Lee": not a new sentence
    return not (previous and previous.group(1).lower() in TITLES)


_NOT_NAMES = frozenset({"i", "i'm", "i've", "i'll", "i'd", "ok", "okay", "person", "am", "pm"})


def name_mentions(summary: str) -> list[tuple[int, int, str]]:
    """Runs of capitalised words (names, places, months, organisations) as (start, end, text):
    speaker tags, 'I', single letters and sentence-initial common words are left out; a title
    joins the name after it ("Mr. Brown")."""
    spans: list[list] = []
    for m in _CAP_WORD.finditer(summary):
        word = m.group(0)
        base = _strip_possessive(word).lower()
        if base in _NOT_NAMES:
            continue
        if base not in TITLES and _is_sentence_start(summary, m.start()):
            if base in COMMON_STARTERS:
                continue
            if re.search(rf"(?<![\w#]){re.escape(base)}(?!\w)", summary[m.end():]):
                continue   # also written in lower case in the summary: a common word
        if spans:
            gap = summary[spans[-1][1]:m.start()]
            previous = spans[-1][2].split()[-1].rstrip(".").lower()
            if gap == " " or (re.fullmatch(r"\.\s", gap) and previous in TITLES):
                spans[-1][1] = m.end()
                spans[-1][2] = summary[spans[-1][0]:m.end()]
                continue
        spans.append([m.start(), m.end(), word])
    return [(s, e, t) for s, e, t in spans]


class _WordIndex:
    """The word forms of a dialogue (lower case, possessives and plurals stripped, stems)."""

    def __init__(self, text: str):
        tokens = re.findall(r"[A-Za-z][A-Za-z'’\-]*", _TAG.sub(" ", text))
        self.forms: set[str] = set()
        for token in tokens:
            for part in [token, *token.split("-")]:
                self.forms.update(_word_forms(part))
        # acronyms written with separators in transcripts: "T_V_", "D_V_D_", "U.S."
        self.forms.update(m.replace("_", "").replace(".", "").lower()
                          for m in re.findall(r"\b(?:[A-Za-z][_.]){2,}", text))

    def supports(self, word: str) -> bool:
        """Every part of `word` is in the dialogue; a name of 5+ letters also matches one typo away
        ("Chrisopher" ~ "Christopher": references and models misspell names, they do not invent them)."""
        for part in (p for p in re.split(r"[-]", word) if p):
            forms = _word_forms(part)
            if forms & self.forms:
                continue
            w = _strip_possessive(part.lower())
            if len(w) >= 5 and any(f[0] == w[0] and _one_edit(w, f) for f in self._by_length(len(w))):
                continue
            return False
        return True

    def _by_length(self, n: int) -> list[str]:
        if not hasattr(self, "_lengths"):
            self._lengths: dict[int, list[str]] = {}
            for f in self.forms:
                self._lengths.setdefault(len(f), []).append(f)
        return [f for k in (n - 1, n, n + 1) for f in self._lengths.get(k, ())]


def unsupported_mentions(summary: str, dialogue: str) -> tuple[list[dict], int]:
    """(unsupported mentions as {start, end, text, kind}, number of mentions checked)."""
    words, numbers = _WordIndex(dialogue), _NumberIndex(dialogue)
    dialogue_tags = {_normalise_tag(m.group(0)) for m in _TAG.finditer(dialogue)}
    bad: list[dict] = []
    checked = 0
    for m in _TAG.finditer(summary):
        if _normalise_tag(m.group(0)) not in dialogue_tags:
            checked += 1
            bad.append({"start": m.start(), "end": m.end(), "text": m.group(0), "kind": "speaker"})
    for start, end, text in name_mentions(summary):
        checked += 1
        tokens = [t for t in re.split(r"\s+|\.\s*", text) if t]
        missing = [t for t in tokens if _strip_possessive(t).lower() not in TITLES and not words.supports(t)]
        if missing:
            lower = {_strip_possessive(t).lower() for t in missing}
            kind = "date" if lower & set(MONTHS + WEEKDAYS) else "name"
            bad.append({"start": start, "end": end, "text": text, "kind": kind})
    for m in number_mentions(summary):
        if m.ambiguous:
            continue
        checked += 1
        if not numbers.supports(m):
            bad.append({"start": m.start, "end": m.end, "text": m.text, "kind": "time" if m.times else "number"})
    bad.sort(key=lambda b: b["start"])
    return bad, checked


# --- 2. speaker attribution -----------------------------------------------------------------------
_LEAD_IN = re.compile(r"^(?:(?:then|finally|later|afterwards|after that|at last|in the end|eventually|so|and|but|also|"
                      r"now|first|next|at first|meanwhile|however|therefore|thus|because|since|when|as|if|though|"
                      r"although|while|before|after)\b[\s,]*)*$", re.IGNORECASE)


_JOINT_VERBS = re.compile(r"\s*(?:helps?|helped|helping|assists?|assisted|serves?|served|interviews?|interviewed|"
                          r"accompan\w*|meets?|met|joins?|joined|works? with|chats? with|talks? (?:with|to))\b",
                          re.IGNORECASE)


def _mention_pattern(speakers: list[str]) -> re.Pattern | None:
    parts = []
    for s in speakers:
        tag = _TAG.fullmatch(s)
        if tag:
            parts.append(rf"#\s*Person\s*{tag.group(1)}\s*#")
        elif re.search(r"[A-Za-z]", s):
            parts.append(rf"(?<![\w#]){re.escape(s)}(?![\w#])")
    if not parts:
        return None
    return re.compile("|".join(f"(?:{p})" for p in parts))


def _speaker_of_mention(text: str, speakers: list[str]) -> str | None:
    norm = _normalise_tag(text)
    return norm if norm in speakers else (text if text in speakers else None)


def attributed_clauses(summary: str, speakers: list[str]) -> list[dict]:
    """Clauses whose subject is one speaker: {sentence, clause, speaker, content} (content: stems)."""
    pattern = _mention_pattern(speakers)
    if pattern is None:
        return []
    out = []
    mention = pattern.pattern
    splitter = re.compile(rf";\s+|,\s+(?:and|but|so|while|whereas|then|because)\s+|\s+(?:but|while|whereas|because)\s+|"
                          rf"\s+and\s+(?={mention})|,\s+(?={mention})|\s+so\s+(?={mention})")
    for sentence in split_sentences(summary).split("\n"):
        pieces: list[str] = []
        for piece in splitter.split(sentence):
            if pieces and pattern.fullmatch(pieces[-1].strip()):   # "A and B discuss": one joint subject
                pieces[-1] = f"{pieces[-1]} and {piece}"
            else:
                pieces.append(piece)
        for clause in pieces:
            if not clause or not clause.strip():
                continue
            m = pattern.search(clause)
            if not m:
                continue
            before = clause[:m.start()].strip()
            if before and not (_LEAD_IN.match(before) or (before.endswith(",") and len(before.split()) <= 6)):
                continue
            after = clause[m.end():]
            if re.match(r"\s*(?:'s|’s|'|and\b|&|or\b|,|together|both|each)", after):
                continue
            speaker = _speaker_of_mention(m.group(0), speakers)
            if speaker is None or _JOINT_VERBS.match(after):
                continue   # "A helps B order ...": what follows is B's act as much as A's
            content = [s for s in _content_stems(pattern.sub(" ", after)) if s not in REPORTING_STEMS]
            out.append({"sentence": sentence.strip(), "clause": clause.strip(), "speaker": speaker,
                        "content": content})
    return out


def misattributions(summary: str, turns: list[Turn]) -> tuple[list[dict], int, str | None]:
    """(misattributed sentences with their supporting turn, attributed sentences judged, reason when none)."""
    speakers = speakers_of(turns)
    if len(speakers) < 2:
        return [], 0, "the dialogue has fewer than two tagged speakers ('Name: text' lines)"
    clauses = attributed_clauses(summary, speakers)
    judged = [c for c in clauses if len(set(c["content"])) >= ATTRIBUTION_MIN_CONTENT]
    if not judged:
        return [], 0, ("no summary sentence attributes an act to a speaker of this dialogue"
                       if not clauses else "no attributed sentence has enough content words to judge")
    turn_stems = [set(_content_stems(t.text)) for t in turns]
    df = Counter(s for stems in turn_stems for s in stems)
    idf = {s: math.log(1 + len(turns) / df[s]) for s in df}
    bad: dict[str, dict] = {}
    sentences = set()
    for c in judged:
        sentences.add(c["sentence"])
        content = set(c["content"])
        weight = sum(idf.get(s, 0.0) for s in content)
        best: dict[str, tuple[float, int]] = {}
        for i, (turn, stems) in enumerate(zip(turns, turn_stems)):
            score = sum(idf[s] for s in content & stems)
            if turn.speaker is not None and score > best.get(turn.speaker, (-1.0, -1))[0]:
                best[turn.speaker] = (score, i)
        named = best.get(c["speaker"], (0.0, -1))[0]
        others = [(score, i, sp) for sp, (score, i) in best.items() if sp != c["speaker"]]
        if not others or weight <= 0:
            continue
        score, i, other = max(others)
        margin = (score - named) / weight
        if margin >= ATTRIBUTION_MARGIN and c["sentence"] not in bad:
            bad[c["sentence"]] = {"sentence": c["sentence"], "named_speaker": c["speaker"], "said_by": other,
                                  "supporting_turn": f"{other}: {turns[i].text}", "margin": round(margin, 3)}
    return list(bad.values()), len(sentences), None


# --- 3. support with a sentence encoder -----------------------------------------------------------
def _embedding_text(text: str) -> str:
    return re.sub(r"\s+", " ", _TAG.sub(lambda m: f"Person {m.group(1)}", text)).strip()


def dialogue_units(turns: list[Turn]) -> list[str]:
    """The dialogue as embedding units: each turn with its speaker label, long turns cut into
    pieces of WINDOW_UNIT_WORDS words."""
    units = []
    for t in turns:
        words = t.text.split()
        label = f"{_embedding_text(t.speaker)}: " if t.speaker else ""
        for i in range(0, len(words), WINDOW_UNIT_WORDS):
            units.append(label + _embedding_text(" ".join(words[i:i + WINDOW_UNIT_WORDS])))
    return units


def sentence_support(sentences: list[str], units: list[str], encoder) -> list[float]:
    """Best cosine similarity of each sentence to a window of the dialogue: a unit, or the mean
    embedding of 2..WINDOW_SPAN consecutive units (which approximates embedding their concatenation
    and costs nothing more: only units are encoded)."""
    import numpy as np
    vectors = encoder.encode([_embedding_text(s) for s in sentences] + units)
    sent, unit = vectors[:len(sentences)], vectors[len(sentences):]
    windows = [unit]
    for span in range(2, WINDOW_SPAN + 1):
        if len(unit) >= span:
            mean = np.stack([unit[i:i + span].mean(axis=0) for i in range(len(unit) - span + 1)])
            windows.append(mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(min=1e-9))
    return [float(x) for x in (sent @ np.vstack(windows).T).max(axis=1)]


# --- 4. coverage by position ----------------------------------------------------------------------
def _segment_of(position: int, total: int, k: int) -> int:
    return min(k - 1, position * k // max(total, 1))


def coverage(summary: str, dialogue: str, input_limit_words: int | None = None) -> tuple[dict, list[str]]:
    """coverage_<segment>, middle_recall and coverage_beyond_limit, with reasons for the Nones."""
    k = len(SEGMENTS)
    words = dialogue.split()
    total = len(words)
    out: dict[str, Any] = {f"coverage_{s}": None for s in SEGMENTS}
    out.update({"middle_recall": None, "coverage_beyond_limit": None, "dialogue_words": total})
    reasons: list[str] = []
    positions: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        for stem in _content_stems(w):
            positions.setdefault(stem, []).append(i)
    summary_stems = set(_content_stems(summary))
    mass = [0.0] * k
    beyond = [0.0, 0.0]       # weight before / after the input limit
    for stem in summary_stems & set(positions):
        segs = Counter(_segment_of(p, total, k) for p in positions[stem])
        count = sum(segs.values())
        # specificity: log(k / effective number of segments), effective = exp(entropy of the spread)
        entropy = -sum(c / count * math.log(c / count) for c in segs.values())
        weight = math.log(k) - entropy
        if weight <= 1e-9:
            continue
        for seg, c in segs.items():
            mass[seg] += weight * c / count
        if input_limit_words:
            after = sum(p >= input_limit_words for p in positions[stem])
            beyond[1] += weight * after / count
            beyond[0] += weight * (count - after) / count
    if sum(mass) > 0:
        out.update({f"coverage_{s}": mass[i] / sum(mass) for i, s in enumerate(SEGMENTS)})
    else:
        reasons.append("coverage: none of the summary's content words is specific to a part of the dialogue")
    if not input_limit_words:
        reasons.append("middle_recall: no input limit given (input_limit_words)")
    elif total <= input_limit_words:
        reasons.append(f"middle_recall: the dialogue fits the input ({total} <= {input_limit_words} words)")
    else:
        if sum(beyond) > 0:
            out["coverage_beyond_limit"] = beyond[1] / sum(beyond)
        middle = k // 2
        counts = Counter()
        for stem, pos in positions.items():
            inside = sum(_segment_of(p, total, k) == middle for p in pos)
            if inside >= MIDDLE_SHARE * len(pos):
                counts[stem] = inside
        key = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], positions[kv[0]][0]))][:MIDDLE_KEY_WORDS]
        if key:
            out["middle_recall"] = sum(s in summary_stems for s in key) / len(key)
        else:
            reasons.append("middle_recall: the middle third has no words of its own")
    return out, reasons


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


def score_sample(prediction: str, dialogue: str, *, encoder=None, input_limit_words: int | None = None) -> dict:
    """Every check for one summary against its dialogue (see the module docstring)."""
    row = _empty_row()
    reasons: list[str] = []
    prediction = prediction if isinstance(prediction, str) else ""
    dialogue = dialogue if isinstance(dialogue, str) else ""
    row["dialogue_words"] = len(dialogue.split())
    if not dialogue.strip():
        row["reasons"] = "all: no dialogue"
        return row
    if not re.search(r"\w", prediction):
        row["reasons"] = "all: empty summary"
        return row
    problem = _english_problem(prediction + "\n" + dialogue)
    if problem:
        row["reasons"] = f"all: {problem}"
        return row
    # 1. unsupported mentions
    bad, checked = unsupported_mentions(prediction, dialogue)
    row["unsupported_count"] = len(bad)
    row["mentions_checked"] = checked
    row["unsupported_spans"] = bad
    if checked:
        row["unsupported_rate"] = len(bad) / checked
    else:
        reasons.append("unsupported_rate: the summary has no names, numbers or times to check")
    # 2. attribution
    turns = parse_turns(dialogue)
    wrong, judged, why = misattributions(prediction, turns)
    if judged:
        row.update({"misattributed_rate": len(wrong) / judged, "misattributed_count": len(wrong),
                    "attributed_sentences": judged, "misattributed_examples": wrong})
    else:
        reasons.append(f"misattributed_rate: {why}")
    # 3. support
    if encoder is not None:
        sentences = [s for s in split_sentences(prediction).split("\n") if re.search(r"\w", s)]
        units = dialogue_units(turns)
        if sentences and units:
            support = sentence_support(sentences, units, encoder)
            weakest = min(range(len(support)), key=support.__getitem__)
            row.update({"support_min": support[weakest], "support_mean": sum(support) / len(support),
                        "weakest_sentence": sentences[weakest],
                        "sentence_support": [{"sentence": s, "support": round(v, 4)}
                                             for s, v in zip(sentences, support)]})
    # 4. coverage
    cov, why_cov = coverage(prediction, dialogue, input_limit_words)
    row.update(cov)
    reasons += why_cov
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
