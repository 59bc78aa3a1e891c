"""Numbers, times and amounts in a text, normalised so that "three" = "3", "3 pm" = "15:00" =
"three o'clock" and "$50" = "50 dollars" (for the unsupported-mention check, quality/faith_mentions.py).

`number_mentions(text)` finds them as non-overlapping character spans; `NumberIndex(dialogue)`
says whether the dialogue supports one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from finetuneflow.quality.faith_text import TAG

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
    masked = TAG.sub(lambda m: " " * len(m.group(0)), text)
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


class NumberIndex:
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
