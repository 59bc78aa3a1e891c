"""Reference baselines: summaries that need no model and show what a model must beat.

* lead-k: the first k turns of the dialogue (turns are lines);
* extractive: the k most central turns, in dialogue order. A turn longer than 60 words (AMI
  meetings put a speaker's whole contribution on one line) is split into sentences that keep
  the speaker label. Centrality = sum over the distinct content words of the unit (lower-case,
  3+ letters, not a stop word) of their frequency in the whole dialogue, divided by the square
  root of the unit's content-word count (so long units do not win by length alone).

Both are cut to `max_words` words (0 = no cut), as the models are cut by MAX_NEW_TOKENS.
"""
from __future__ import annotations

import math
import re

STOPWORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further get got had
has have having he her here hers herself him himself his how i if in into is it its itself just let me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she should so some
such than that the their theirs them themselves then there these they this those through to too under until up
very was we were what when where which while who whom why will with would you your yours yourself yourselves yes
yeah okay ok oh um uh mm hmm well like gonna wanna really thing things think know just right one two sure""".split())
_SPEAKER = re.compile(r"^\s*([^:\n]{1,40}):\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z']{2,}")


def parse_reference(entry: str, lead_k: int, extractive_k: int) -> tuple[str, int] | None:
    """("lead", k) for "lead-3" / "lead-k", ("extractive", k) for "extractive" / "extractive-2"; else None."""
    match = re.fullmatch(r"(lead|extractive)(?:-(\d+|k))?", entry.strip().lower())
    if not match or (match.group(1) == "lead" and match.group(2) is None):
        return None
    k = match.group(2)
    default = lead_k if match.group(1) == "lead" else extractive_k
    return match.group(1), int(k) if k and k.isdigit() else default


def split_turns(dialogue: str) -> list[str]:
    return [line.strip() for line in dialogue.split("\n") if line.strip()]


def cut_words(text: str, max_words: int) -> str:
    """The first `max_words` words, line breaks kept (0 = all)."""
    if not max_words:
        return text
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text if len(ends) <= max_words else text[:ends[max_words - 1]]


def lead_summary(dialogue: str, k: int, max_words: int = 0) -> str:
    return cut_words("\n".join(split_turns(dialogue)[:k]), max_words)


def _units(dialogue: str) -> list[str]:
    units = []
    for turn in split_turns(dialogue):
        if len(turn.split()) <= 60:
            units.append(turn)
            continue
        match = _SPEAKER.match(turn)
        speaker, body = (match.group(1) + ": ", turn[match.end():]) if match else ("", turn)
        units += [speaker + s for s in _SENTENCE.split(body) if s.strip()]
    return units


def _content_words(text: str) -> list[str]:
    match = _SPEAKER.match(text)
    body = text[match.end():] if match else text
    return [w for w in (m.group(0).lower().strip("'") for m in _WORD.finditer(body)) if w not in STOPWORDS]


def extractive_summary(dialogue: str, k: int, max_words: int = 0) -> str:
    units = _units(dialogue)
    words = [_content_words(u) for u in units]
    freq: dict[str, int] = {}
    for unit_words in words:
        for w in unit_words:
            freq[w] = freq.get(w, 0) + 1
    scores = [sum(freq[w] for w in set(ws)) / math.sqrt(len(ws)) if ws else 0.0 for ws in words]
    chosen = sorted(sorted(range(len(units)), key=lambda i: -scores[i])[:k])
    return cut_words("\n".join(units[i] for i in chosen), max_words)


def reference_summaries(kind: str, k: int, dialogues: list[str], max_words: int) -> list[str]:
    make = lead_summary if kind == "lead" else extractive_summary
    return [make(d, k, max_words) for d in dialogues]
