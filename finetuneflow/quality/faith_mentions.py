"""Unsupported mentions: names, places, dates (capitalised words), numbers, times and amounts of a
summary that its dialogue does not contain, as character spans of the summary.

Normalised: number words and digits (quality/faith_numbers.py), plurals and possessives
("Smiths", "Tom's"), a name one typo away, speaker tags (`#Person1#` is supported only by a
dialogue that has it). Sentence-initial common words ("Finally", "Both") are not mentions.
"""
from __future__ import annotations

import functools
import re

from finetuneflow.quality.faith_numbers import NumberIndex, number_mentions
from finetuneflow.quality.faith_text import TAG, normalise_tag, stem

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
TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "miss", "sir", "madam", "mister", "st", "mt"})
MONTHS = ("january february march april may june july august september october november december").split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()

_CAP_WORD = re.compile(r"(?<![\w#])(?:[A-Z][a-z]+(?:[-'][A-Za-z]+)*|[A-Z][a-z]*[A-Z][a-z]+|[A-Z]{2,})"
                       r"(?:'s|’s|s'|’)?(?![\w#])")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*|[\"(]\s*|^\s*[-*]\s*)$")


def _strip_possessive(word: str) -> str:
    word = re.sub(r"'(?:re|ll|ve|d|m)$", "", word.replace("’", "'"), flags=re.IGNORECASE)   # "They're", "Mom'll"
    for suffix in ("'s", "s'", "'"):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            return word[:-len(suffix)] if suffix != "s'" else word[:-1]
    return word


def _word_forms(word: str) -> set[str]:
    """Lower-cased forms a mention is matched by: as is, without possessive, singular, stem."""
    w = _strip_possessive(word.lower())
    forms = {w, stem(w)}
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
        tokens = re.findall(r"[A-Za-z][A-Za-z'’\-]*", TAG.sub(" ", text))
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


@functools.lru_cache(maxsize=32)
def _dialogue_side(dialogue: str) -> tuple[_WordIndex, NumberIndex, frozenset]:
    """A dialogue's word and number indexes and speaker tags, built once for the summaries checked
    against it (MBR checks every candidate of a row against the same dialogue)."""
    return _WordIndex(dialogue), NumberIndex(dialogue), frozenset(normalise_tag(m.group(0))
                                                                   for m in TAG.finditer(dialogue))


def unsupported_mentions(summary: str, dialogue: str) -> tuple[list[dict], int]:
    """(unsupported mentions as {start, end, text, kind}, number of mentions checked)."""
    words, numbers, dialogue_tags = _dialogue_side(dialogue)
    bad: list[dict] = []
    checked = 0
    for m in TAG.finditer(summary):
        if normalise_tag(m.group(0)) not in dialogue_tags:
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
