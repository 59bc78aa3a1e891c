"""Where a summary's content comes from in its dialogue.

* Support: each summary sentence's best cosine similarity to a window of dialogue turns, with a
  local sentence encoder (all-MiniLM-L6-v2, see quality/encoder.py).
* Coverage by position: the dialogue is cut into thirds of its words; each content word of the
  summary found in the dialogue counts for the thirds it occurs in, weighted by how specific it is
  to them (a word found in every third counts for none); the shares sum to 1. For a dialogue
  longer than the model's input limit (in whitespace WORDS of the dialogue), `middle_recall` is the
  share of the middle third's key words (the `MIDDLE_KEY_WORDS` most frequent content words with
  at least `MIDDLE_SHARE` of their occurrences there) that the summary uses, and
  `coverage_beyond_limit` the share of the summary's positional weight that lies past the limit.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from finetuneflow.quality.faith_text import TAG, Turn, content_stems

SEGMENTS = ("begin", "middle", "end")     # coverage by thirds of the dialogue's words
MIDDLE_KEY_WORDS = 20                     # key words of the middle third for middle_recall ...
MIDDLE_SHARE = 0.75                       # ... words with at least this share of their occurrences there
WINDOW_UNIT_WORDS = 64                    # turns longer than this are cut into pieces of this many words
WINDOW_SPAN = 3                           # windows: each piece, and runs of 2..WINDOW_SPAN consecutive pieces


# --- support with a sentence encoder --------------------------------------------------------------
def _embedding_text(text: str) -> str:
    return re.sub(r"\s+", " ", TAG.sub(lambda m: f"Person {m.group(1)}", text)).strip()


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


# --- coverage by position -------------------------------------------------------------------------
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
        for stem in content_stems(w):
            positions.setdefault(stem, []).append(i)
    summary_stems = set(content_stems(summary))
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
