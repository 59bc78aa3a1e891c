"""Cutting a dialogue that is too long for the model into windows that fit (engine/long_input.py
summarizes them).

A dialogue is split at turn boundaries (lines) into windows that fit the input limit with the
engine's prompt; a single turn longer than a window is split at sentence, then word boundaries
(its speaker label, e.g. "Speaker A:", is repeated at the start of a window that begins
mid-turn). Windows are packed greedily, then evened out to similar sizes.

Token counts are exact: they are made with the same prompt/prefix the engine uses, and every
window is re-counted after packing (tokenizers merge across seams), so no window is cut.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import input_limit
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, text_ids

_SPEAKER = re.compile(r"^\s*([^\s:][^:\n]{0,39}:)\s")       # "Speaker A:", "#Person1#:", "Anna:"
_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])\s+")
WINDOW_MARGIN = 4           # tokens kept free when estimating; windows are re-counted exactly


class TokenCounter:
    """Exact input-token counts as the engine would encode a text (before any truncation)."""

    def __init__(self, loaded: LoadedModel, instruction: str):
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.prompt = loaded.prompt(instruction)
        self.overhead = self.family.input_overhead(self.tokenizer, self.prompt)

    def input_tokens(self, texts: list[str]) -> list[int]:
        return self.family.count_inputs(self.tokenizer, texts, self.prompt)

    def text_tokens(self, texts: list[str]) -> list[int]:
        return [len(i) for i in text_ids(self.tokenizer, texts)] if texts else []


@dataclass
class _Piece:
    text: str
    tokens: int
    turn: int       # index of the line it comes from
    first: bool     # starts its turn
    label: str      # the turn's speaker label ("" when none)


def input_tokens(loaded: LoadedModel, dialogues: list[str], instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """How many input tokens each dialogue needs with the engine's prompt (no truncation)."""
    return TokenCounter(loaded, instruction).input_tokens(list(dialogues))


def _split_turn(counter: TokenCounter, line: str, budget: int) -> list[str]:
    """A turn longer than `budget` tokens -> sentence-, then word-, then token-sized parts."""
    parts: list[str] = []
    sentences = [s for s in _SENTENCE_END.split(line) if s]
    for sentence, size in zip(sentences, counter.text_tokens(sentences)):
        if size <= budget:
            parts.append(sentence)
            continue
        words = sentence.split()
        current, used = [], 0
        for word, cost in zip(words, counter.text_tokens([" " + w for w in words])):
            if cost > budget:  # one "word" longer than a window (a URL, a table): cut by tokens
                if current:
                    parts.append(" ".join(current))
                    current, used = [], 0
                ids = text_ids(counter.tokenizer, word)
                parts += [counter.tokenizer.decode(ids[i:i + budget]) for i in range(0, len(ids), budget)]
                continue
            if current and used + cost > budget:
                parts.append(" ".join(current))
                current, used = [], 0
            current.append(word)
            used += cost
        if current:
            parts.append(" ".join(current))
    return parts


def _pieces(counter: TokenCounter, text: str, cap: int) -> tuple[list[_Piece], dict[str, int]]:
    """Turns (non-blank lines) as pieces of at most `cap` - 1 estimated tokens, long turns split;
    plus the token cost of each speaker label."""
    lines = [line.rstrip() for line in text.split("\n") if line.strip()]
    labels = [(m.group(1) if (m := _SPEAKER.match(line)) else "") for line in lines]
    label_costs = dict(zip(set(labels), counter.text_tokens(list(set(labels)))))
    pieces = []
    for turn, (line, size) in enumerate(zip(lines, counter.text_tokens(lines))):
        label = labels[turn]
        if size + 1 <= cap:
            pieces.append(_Piece(line, size, turn, True, label))
            continue
        room = cap - label_costs[label] - 2      # a continuation window repeats the label
        if room < 8:
            raise UserError(f"MAX_INPUT_LENGTH leaves only {cap} tokens per window; raise MAX_INPUT_LENGTH")
        parts = _split_turn(counter, line, room)
        for k, (part, cost) in enumerate(zip(parts, counter.text_tokens(parts))):
            pieces.append(_Piece(part, cost, turn, k == 0, label))
    return pieces, label_costs


def _pack(pieces: list[_Piece], cap: int, label_costs: dict) -> list[list[_Piece]]:
    """Greedy packing of pieces into windows of at most `cap` estimated tokens."""
    windows, current, used = [], [], 0
    for piece in pieces:
        cost = piece.tokens + 1
        if current and used + cost > cap:
            windows.append(current)
            current, used = [], 0
        if not current and not piece.first and piece.label:
            used += label_costs[piece.label] + 1
        current.append(piece)
        used += cost
    if current:
        windows.append(current)
    return windows


def _render(window: list[_Piece]) -> str:
    out = []
    for i, piece in enumerate(window):
        if i == 0:
            out.append(piece.text if piece.first or not piece.label else f"{piece.label} {piece.text}")
        else:
            out.append(("\n" if piece.turn != window[i - 1].turn else " ") + piece.text)
    return "".join(out)


def split_into_windows(loaded: LoadedModel, dialogue: str, max_input_length: int | None = None,
                       instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
    """Windows of `dialogue`, each fitting `max_input_length` input tokens with the engine's
    prompt, cut at turn boundaries (long turns at sentence/word boundaries), in order and of
    similar size. A dialogue that fits comes back as one window."""
    counter = TokenCounter(loaded, instruction)
    limit = input_limit(loaded, None, max_input_length)
    if counter.input_tokens([dialogue])[0] <= limit:
        return [dialogue]
    budget = limit - counter.overhead
    if budget < 16:
        raise UserError(f"MAX_INPUT_LENGTH={limit} leaves {budget} tokens for the dialogue after the "
                        f"{counter.overhead}-token prompt; raise MAX_INPUT_LENGTH")
    cap = budget - WINDOW_MARGIN
    pieces, label_costs = _pieces(counter, dialogue, cap)
    windows = _pack(pieces, cap, label_costs)
    # Even out the sizes: the smallest cap that still needs no more windows than the greedy pass.
    total = sum(p.tokens + 1 for p in pieces)
    step = max(1, cap // 50)
    for trial in range(math.ceil(total / len(windows)), cap, step):
        balanced = _pack(pieces, trial, label_costs)
        if len(balanced) <= len(windows):
            windows = balanced
            break
    return _fit_exactly(counter, windows, limit)


def _fit_exactly(counter: TokenCounter, windows: list[list[_Piece]], limit: int) -> list[str]:
    """Re-count each rendered window exactly; split any that the estimate let through."""
    texts = [_render(w) for w in windows]
    out = []
    for window, text, size in zip(windows, texts, counter.input_tokens(texts)):
        if size <= limit:
            out.append(text)
        elif len(window) > 1:
            half = len(window) // 2
            out += _fit_exactly(counter, [window[:half], window[half:]], limit)
        else:  # one piece whose seam merges pushed it over: cut its words in two
            piece = window[0]
            words = piece.text.split()
            if len(words) < 2:
                raise UserError(f"cannot split a {size}-token fragment to fit MAX_INPUT_LENGTH={limit}")
            halves = [" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])]
            parts = [_Piece(h, c, piece.turn, piece.first and k == 0, piece.label)
                     for k, (h, c) in enumerate(zip(halves, counter.text_tokens(halves)))]
            out += _fit_exactly(counter, [[parts[0]], [parts[1]]], limit)
    return out
