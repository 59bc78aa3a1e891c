"""Corrupted versions of a reference summary: the errors the faithfulness checks must catch.

One module makes them for both uses: `benchmarks/bench_faithfulness.py` validates the checks on
them, and preference training (OBJECTIVE=dpo|orpo, train/pairs.py) uses them as the rejected
summaries, so a model is taught to avoid exactly the errors the shipped checks measure.

* speaker_swap:    the two speakers swapped everywhere in the summary (#Person1# <-> #Person2#, or the
                   two names of a 'Name: text' chat); only where some clause has one speaker as its
                   subject (otherwise a swap changes nothing);
* number_change:   one number, time or amount the dialogue supports changed to a value it lacks
                   ("6 p.m." -> "8 p.m.", "three" -> "five", "$200" -> "$205");
* name_insert:     a person's name from another dialogue (one this dialogue does not contain) replaces
                   a speaker mention, or is added as "with <Name>" to a sentence;
* sentence_append: the first sentence of another dialogue's summary (another topic, when the rows
                   carry one) appended.

`corrupt(rows, seed)` returns, per row, each corruption's text or None where it cannot apply
(no number to change, no other name, ...). It is deterministic for a seed: row i draws from
`random.Random(f"{seed}-{i}")` alone, in a fixed order, so a row's corruptions do not depend on
which other kinds are asked for.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from finetuneflow.quality.faith_numbers import NumberIndex, number_mentions
from finetuneflow.quality.faith_text import parse_turns, speakers_of
from finetuneflow.quality.metrics import split_sentences

CORRUPTIONS = ("speaker_swap", "number_change", "name_insert", "sentence_append")
# the short names the training stage's NEGATIVES setting uses
KINDS = {"name": "name_insert", "number": "number_change", "speaker": "speaker_swap", "sentence": "sentence_append"}

_TAG = re.compile(r"#Person(\d)#")
_WORD_NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "fifteen", "twenty", "thirty", "forty", "fifty", "hundred"]
_NUMBER_TOKEN = re.compile(r"(?<![\w#.])(\d{1,3}(?:,\d{3})+|\d+)(?![\d,]*#)|\b(" + "|".join(_WORD_NUMBERS) + r")\b",
                           re.IGNORECASE)
_MONTHS_DAYS = set("january february march april may june july august september october november december monday "
                   "tuesday wednesday thursday friday saturday sunday".split())


def speaker_labels(dialogue: str) -> list[str]:
    """The speakers of a dialogue, in order of appearance (#Person1#, or chat names)."""
    return speakers_of(parse_turns(dialogue))


def swap_speakers(summary: str, dialogue: str) -> str | None:
    """The two speakers swapped, when some clause has exactly one of them as subject."""
    speakers = speaker_labels(dialogue)
    if len(speakers) != 2:
        return None
    a, b = speakers
    if _TAG.fullmatch(a) and _TAG.fullmatch(b):
        pa, pb = re.escape(a), re.escape(b)
    else:
        pa, pb = rf"\b{re.escape(a)}\b", rf"\b{re.escape(b)}\b"
    subject = re.compile(rf"(?:^|[.;!?]\s+|,\s+|\band\s+|\bbut\s+|\bso\s+|\bthen\s+)({pa}|{pb})"
                         rf"(?!'s|’s|\s+and\b|\s*&)")
    joint = re.compile(rf"(?:{pa}|{pb})\s+(?:and|&)\s+$")
    if not any(not joint.search(summary[:m.start(1)]) for m in subject.finditer(summary)):
        return None   # only "A and B ..." subjects: a swap changes nothing
    swapped = re.sub(f"{pa}|{pb}", lambda m: b if m.group(0) == a else a, summary)
    return swapped if swapped != summary else None


def change_number(summary: str, dialogue: str, rng: random.Random) -> str | None:
    """One number of the summary that also occurs in the dialogue, changed to a value the dialogue lacks."""
    index = NumberIndex(dialogue)
    candidates = [m for m in _NUMBER_TOKEN.finditer(summary)]
    rng.shuffle(candidates)
    for m in candidates:
        if m.group(1):
            value = int(m.group(1).replace(",", ""))
            for delta in rng.sample([1, 2, 3, 5, 10], 5):
                new = value + delta if value < 1000 else value + delta * 100
                text = f"{new:,}" if "," in m.group(1) else str(new)
                number = re.escape(m.group(1))
                if re.search(rf"{number}\s*:\s*\d\d|{number}\s*[ap]\.?\s?m", summary[m.start():]) and new > 12:
                    new = (value % 12) + 2
                    text = str(new)
                candidate = summary[:m.start()] + text + summary[m.end():]
                changed = [x for x in number_mentions(candidate) if x.start <= m.start() < x.end]
                if changed and not index.supports(changed[0]):
                    return candidate
        else:
            word = m.group(2).lower()
            for new in rng.sample(_WORD_NUMBERS, len(_WORD_NUMBERS)):
                if new == word:
                    continue
                text = new.capitalize() if m.group(2)[0].isupper() else new
                candidate = summary[:m.start()] + text + summary[m.end():]
                changed = [x for x in number_mentions(candidate) if x.start <= m.start() < x.end]
                if changed and not index.supports(changed[0]):
                    return candidate
    return None


def name_pool(rows: list[dict]) -> list[str]:
    """Person-like names: capitalised words after 'Hi/Hey/Hello/Thanks/Dear' or 'I'm/This is/name is' in the
    dialogues, never written in lower case anywhere in the corpus."""
    lower_words = Counter()
    for r in rows:
        lower_words.update(re.findall(r"\b[a-z]+\b", r["dialogue"] + " " + r["summary"]))
    names = Counter()
    cue = re.compile(r"\b(?:Hi|Hey|Hello|Thanks|Thank you|Dear|Bye|I'm|I am|This is|name is|Mr\.|Mrs\.|Ms\.|Miss)"
                     r"\s*,?\s+"
                     r"([A-Z][a-z]{2,})\b")
    for r in rows:
        for m in cue.finditer(r["dialogue"]):
            name = m.group(1)
            if name.lower() not in lower_words and name.lower() not in _MONTHS_DAYS:
                names[name] += 1
    return sorted(names)


def insert_name(summary: str, dialogue: str, pool: list[str], rng: random.Random) -> str | None:
    dialogue_lower = dialogue.lower()
    choices = [n for n in pool if n.lower() not in dialogue_lower and n.lower() not in summary.lower()]
    if not choices:
        return None
    name = rng.choice(choices)
    speakers = [s for s in speaker_labels(dialogue)]
    mentions = [m for s in speakers for m in re.finditer(re.escape(s), summary)]
    if mentions and rng.random() < 0.5:
        m = rng.choice(mentions)
        return summary[:m.start()] + name + summary[m.end():]
    sentences = [m for m in re.finditer(r"[^.!?]+[.!?]?", summary) if m.group(0).strip()]
    if not sentences:
        return None
    s = rng.choice(sentences)
    body = s.group(0).rstrip()
    end = body[-1] if body[-1] in ".!?" else ""
    body = body[:-1] if end else body
    return summary[:s.start()] + body + f" with {name}" + end + summary[s.start() + len(s.group(0).rstrip()):]


def append_sentence(summary: str, index: int, rows: list[dict], rng: random.Random) -> str | None:
    topic = rows[index].get("topic")
    for _ in range(50):
        j = rng.randrange(len(rows))
        if j == index or (topic and rows[j].get("topic") == topic):
            continue
        first = split_sentences(rows[j]["summary"]).split("\n")[0].strip()
        if first:
            return summary.rstrip() + " " + first
    return None


def corrupt(rows: list[dict], seed: int) -> list[dict]:
    """{corruption: text or None} for every row (None: the corruption cannot apply to it). Row i's
    choices come from random.Random(f"{seed}-{i}") alone, drawn in one fixed order."""
    pool = name_pool(rows)
    out = []
    for i, row in enumerate(rows):
        rng = random.Random(f"{seed}-{i}")
        s, d = row["summary"], row["dialogue"]
        out.append({"speaker_swap": swap_speakers(s, d), "number_change": change_number(s, d, rng),
                    "name_insert": insert_name(s, d, pool, rng), "sentence_append": append_sentence(s, i, rows, rng)})
    return out
