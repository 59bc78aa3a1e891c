"""Words and turns of a dialogue as the faithfulness checks read them (quality/faithfulness.py):
Porter stems of content words, speaker tags (`#Person1#`), one Turn per dialogue line with its
speaker, and whether a text looks like English (the checks are for English).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ENGLISH_MIN_WORDS = 12                    # below this many words, no language check
ENGLISH_MIN_FUNCTION_SHARE = 0.08         # share of common English function words below this: not English
                                          # (English DialogSum/HighlightSum rows: >= 0.11, 1% quantile 0.24)
ENGLISH_MAX_NON_ASCII = 0.30              # share of non-ASCII letters above this: not English

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
# Common English function words (the language check).
_ENGLISH_FUNCTION_WORDS = frozenset("""
the a an and to of in is it you i that for on with was this be have are not but what my your we they he she at
so do can if me about there his her will just all no yes would or like from how
""".split())

_TOKEN = re.compile(r"[a-z]+|\d+")
TAG = re.compile(r"#\s*Person\s*(\d+)\s*#", re.IGNORECASE)
_LABEL_LINE = re.compile(r"^\s*(#\s*Person\s*\d+\s*#|Speaker\s+[A-Z0-9]{1,3}|[A-Za-z][\w'.\-]*(?: [A-Z][\w'.\-]*){0,2})"
                         r"\s*:\s?(.*)$")


_STEMMER = None


@lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """nltk's Porter stemmer (as rouge-score uses), cached."""
    global _STEMMER
    if _STEMMER is None:
        from nltk.stem.porter import PorterStemmer
        _STEMMER = PorterStemmer()
    return _STEMMER.stem(word)


def content_stems(text: str) -> list[str]:
    """Porter stems of the content words (no stop words, no speaker tags), in order."""
    text = TAG.sub(" ", text.lower().replace("’", "'"))
    return [stem(t) for t in _TOKEN.findall(text) if t not in STOPWORDS and len(t) > 1 and not t.isdigit()]


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


def normalise_tag(tag: str) -> str:
    m = TAG.fullmatch(tag.strip())
    return f"#Person{m.group(1)}#" if m else tag.strip()


def speakers_of(turns: list[Turn]) -> list[str]:
    """Speakers in order of first turn."""
    return list(dict.fromkeys(t.speaker for t in turns if t.speaker))


def english_problem(text: str) -> str | None:
    """Why `text` does not look like English (None when it does or is too short to tell)."""
    letters = [c for c in text if c.isalpha()]
    if letters:
        non_ascii = sum(not c.isascii() for c in letters) / len(letters)
        if non_ascii > ENGLISH_MAX_NON_ASCII:
            return (f"the text does not look like English ({non_ascii:.0%} of its letters are not ASCII); "
                    f"these checks are for English")
    words = re.findall(r"[a-z']+", TAG.sub(" ", text.lower()))
    if len(words) < ENGLISH_MIN_WORDS:
        return None
    share = sum(w in _ENGLISH_FUNCTION_WORDS for w in words) / len(words)
    if share < ENGLISH_MIN_FUNCTION_SHARE:
        return (f"the text does not look like English (only {share:.0%} of its words are common English "
                f"words); these checks are for English")
    return None
