"""Speaker attribution: a summary clause whose subject is one of the dialogue's speakers
("#Person2# agrees to ...", "Tom asks Anna ...") is compared with every turn (content words,
Porter-stemmed, weighted by how rare they are among the turns); it looks misattributed when
another speaker's best turn supports it better than any turn of the named speaker by at least
`ATTRIBUTION_MARGIN` of the clause's content weight. Clauses without at least
`ATTRIBUTION_MIN_CONTENT` content words are not judged.
"""
from __future__ import annotations

import math
import re
from collections import Counter

from finetuneflow.quality.faith_text import TAG, Turn, content_stems, normalise_tag, speakers_of
from finetuneflow.quality.metrics import split_sentences

ATTRIBUTION_MIN_CONTENT = 2               # content words a clause needs to be judged
ATTRIBUTION_MARGIN = 0.30                 # (other speaker's best turn - named speaker's best) / clause weight

# Reporting verbs and discourse words that say nothing about what was said (Porter stems).
REPORTING_STEMS = frozenset("""
ask tell say said talk discuss explain answer repli mention inform agre suggest think thought want wonder
inquir offer decid hope feel know describ persuad invit remind agree propos recommend respond call
""".split())

_LEAD_IN = re.compile(r"^(?:(?:then|finally|later|afterwards|after that|at last|in the end|eventually|so|and|but|also|"
                      r"now|first|next|at first|meanwhile|however|therefore|thus|because|since|when|as|if|though|"
                      r"although|while|before|after)\b[\s,]*)*$", re.IGNORECASE)


_JOINT_VERBS = re.compile(r"\s*(?:helps?|helped|helping|assists?|assisted|serves?|served|interviews?|interviewed|"
                          r"accompan\w*|meets?|met|joins?|joined|works? with|chats? with|talks? (?:with|to))\b",
                          re.IGNORECASE)


def _mention_pattern(speakers: list[str]) -> re.Pattern | None:
    parts = []
    for s in speakers:
        tag = TAG.fullmatch(s)
        if tag:
            parts.append(rf"#\s*Person\s*{tag.group(1)}\s*#")
        elif re.search(r"[A-Za-z]", s):
            parts.append(rf"(?<![\w#]){re.escape(s)}(?![\w#])")
    if not parts:
        return None
    return re.compile("|".join(f"(?:{p})" for p in parts))


def _speaker_of_mention(text: str, speakers: list[str]) -> str | None:
    norm = normalise_tag(text)
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
            content = [s for s in content_stems(pattern.sub(" ", after)) if s not in REPORTING_STEMS]
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
    turn_stems = [set(content_stems(t.text)) for t in turns]
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
