"""Dialogues longer than the model's input budget: truncate, refuse, or summarize in windows.

`summarize_long(..., mode=...)` wraps the shared engine (generation.summarize):

* "truncate": the engine as is (the input is cut at MAX_INPUT_LENGTH tokens);
* "error": a UserError naming the first dialogue that does not fit;
* "chunk": a dialogue that does not fit is split at turn boundaries (lines) into windows
  that fit; a single turn longer than a window is split at sentence, then word boundaries
  (its speaker label, e.g. "Speaker A:", is repeated at the start of a window that begins
  mid-turn). Each window is summarized, the partial summaries are joined one per line and
  summarized again, recursively while the joined text is still too long (map-reduce).
  "chunk_join" stops after the windows: their summaries, in order, joined by spaces, are the
  dialogue's summary, so its length grows with the dialogue (a 5,000-word meeting gets a
  summary per window, as long abstracts of meetings do, not one short chat-style summary).
  Dialogues that fit go through the engine unchanged, so "chunk" and "truncate" give the
  same summary for every dialogue that fits.

Token counts are exact: they are made with the same prompt/prefix the engine uses, and every
window is re-counted after packing (tokenizers merge across seams), so no window is cut.

A caller that watches or stops the work (the HTTP server) passes a `Control`: `check()` runs
before every engine batch and may raise `Cancelled` (a client left, a deadline or budget ran
out); `run(call)` runs each engine batch (the server queues it behind other clients' batches);
`part(Part)` receives each window's summary as soon as its batch finishes ("part 2/5"), then the
dialogue's final summary. With a control the engine is called one batch at a time, forming
exactly the batches one call would (same length order, same size), so the summaries are the
same with or without it.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, fields, replace

from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import (GenerationResult, GenerationSettings, default_input_limit,
                                            effective_settings, encode, summarize)
from finetuneflow.model.loading import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, text_ids

MODES = ("truncate", "chunk", "chunk_join", "error")
MAX_LEVELS = 4              # map-reduce depth; beyond it the joined summaries are truncated
_SPEAKER = re.compile(r"^\s*([^\s:][^:\n]{0,39}:)\s")       # "Speaker A:", "#Person1#:", "Anna:"
_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])\s+")
_MARGIN = 4                 # tokens kept free when estimating; windows are re-counted exactly


@dataclass
class LongGenerationResult(GenerationResult):
    chunked: int = 0                                    # inputs summarized in windows
    windows: list[int] = field(default_factory=list)    # first-level windows per input (1 = fitted)


class Cancelled(Exception):
    """Raised by `Control.check()` to stop the work between engine batches."""


@dataclass
class Part:
    """One finished summary of a window (level 0), of joined partial summaries (level 1, 2, ...),
    or a dialogue's final summary (`final`)."""
    dialogue: int           # index of the input dialogue
    level: int              # 0: windows of the dialogue; 1+: combining the partial summaries
    part: int               # 1-based number on this level
    parts: int              # windows on this level
    summary: str
    final: bool
    input_tokens: int = 0
    generated: int = 0
    finish_reason: str = ""


class Control:
    """Hooks for a caller that watches or stops long work; the defaults do nothing."""

    def check(self) -> None:
        """Called before every engine batch; raise Cancelled to stop."""

    def run(self, call):
        """Run one engine batch (`call()`); a server may queue it behind other work first."""
        return call()

    def part(self, part: Part) -> None:
        """A window's (or the final) summary, as soon as its batch has finished."""


def _from_result(result: GenerationResult, **extra) -> LongGenerationResult:
    return LongGenerationResult(**{f.name: getattr(result, f.name) for f in fields(GenerationResult)}, **extra)


class _Counter:
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
    return _Counter(loaded, instruction).input_tokens(list(dialogues))


def _split_turn(counter: _Counter, line: str, budget: int) -> list[str]:
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


def _pieces(counter: _Counter, text: str, cap: int) -> tuple[list[_Piece], dict[str, int]]:
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


def input_limit(loaded: LoadedModel, settings: GenerationSettings | None, max_input_length: int | None) -> int:
    """MAX_INPUT_LENGTH, else the engine's default (the model's limit, less the new tokens of a
    causal model), so windows are cut exactly where the engine would truncate."""
    return max_input_length or default_input_limit(loaded, effective_settings(loaded, settings or GenerationSettings()))


def split_into_windows(loaded: LoadedModel, dialogue: str, max_input_length: int | None = None,
                       instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
    """Windows of `dialogue`, each fitting `max_input_length` input tokens with the engine's
    prompt, cut at turn boundaries (long turns at sentence/word boundaries), in order and of
    similar size. A dialogue that fits comes back as one window."""
    counter = _Counter(loaded, instruction)
    limit = input_limit(loaded, None, max_input_length)
    if counter.input_tokens([dialogue])[0] <= limit:
        return [dialogue]
    budget = limit - counter.overhead
    if budget < 16:
        raise UserError(f"MAX_INPUT_LENGTH={limit} leaves {budget} tokens for the dialogue after the "
                        f"{counter.overhead}-token prompt; raise MAX_INPUT_LENGTH")
    cap = budget - _MARGIN
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


def _fit_exactly(counter: _Counter, windows: list[list[_Piece]], limit: int) -> list[str]:
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


def _describe(dialogue: str, index: int, ids: list[str] | None) -> str:
    name = f"id {ids[index]!r}" if ids else f"#{index + 1}"
    return f"dialogue {name} ({dialogue[:40].strip()!r}...)"


def summarize_long(loaded: LoadedModel, dialogues: list[str], settings: GenerationSettings | None = None,
                   batch_size: int = 8, max_input_length: int | None = None,
                   instruction: str = DEFAULT_INSTRUCTION, mode: str = "truncate", progress: bool = True,
                   ids: list[str] | None = None, control: Control | None = None) -> LongGenerationResult:
    """Summaries of `dialogues` in order; long ones handled by `mode` (see the module doc).
    `ids` (optional) name dialogues in errors; `control` (optional) watches and stops the work."""
    if mode not in MODES:
        raise UserError(f"LONG_INPUT={mode!r} is not one of {', '.join(MODES)}")
    mode, reduce = ("chunk", "join") if mode == "chunk_join" else (mode, "summarize")
    dialogues = list(dialogues)
    settings = settings or GenerationSettings()
    limit = input_limit(loaded, settings, max_input_length)
    run = _Run(loaded, settings, batch_size, limit, instruction, progress, control)
    run.reduce = reduce
    if control is not None:
        control.check()
    if mode == "truncate":
        result = run.engine(dialogues, run.finals(range(len(dialogues)), level=0))
        return _from_result(result, chunked=0, windows=[1] * len(dialogues))
    counter = _Counter(loaded, instruction)
    sizes = counter.input_tokens(dialogues) if dialogues else []
    if mode == "error":
        for i, size in enumerate(sizes):
            if size > limit:
                raise UserError(f"{_describe(dialogues[i], i, ids)} needs {size} input tokens, more than "
                                f"MAX_INPUT_LENGTH={limit}; use LONG_INPUT=chunk (or truncate)")
        result = run.engine(dialogues, run.finals(range(len(dialogues)), level=0))
        return _from_result(result, chunked=0, windows=[1] * len(dialogues))
    start = time.perf_counter()
    summaries, truncated, windows = _map_reduce(run, dialogues, sizes, list(range(len(dialogues))), level=0)
    return LongGenerationResult(summaries, run.generated, time.perf_counter() - start, truncated,
                                run.settings_used, batch_size=run.batch_size, max_input_length=limit,
                                chunked=sum(w > 1 for w in windows), windows=windows)


class _Run:
    """One summarize_long call: its settings, the control, and the totals over engine calls."""

    def __init__(self, loaded, settings, batch_size, limit, instruction, progress, control):
        self.loaded, self.settings, self.batch_size, self.limit = loaded, settings, batch_size, limit
        self.instruction, self.progress, self.control = instruction, progress, control
        self.generated, self.settings_used = 0, {}
        self.reduce = "summarize"

    def engine(self, texts: list[str], parts: list[Part]) -> GenerationResult:
        """The engine's summaries of `texts`; without a control in one call, with a control one
        batch at a time (the same batches), announcing `parts[i]` when text i is done."""
        if self.control is None:
            result = summarize(self.loaded, texts, self.settings, self.batch_size, self.limit, self.instruction,
                               self.progress)
        else:
            result = self._batch_by_batch(texts, parts)
        self.generated += result.generated_tokens
        self.settings_used = self.settings_used or result.settings
        self.batch_size = min(self.batch_size, result.batch_size or self.batch_size)
        return result

    def _batch_by_batch(self, texts: list[str], parts: list[Part]) -> GenerationResult:
        instruction = self.instruction or DEFAULT_INSTRUCTION
        lengths = [len(encode(self.loaded, t, instruction, self.limit)[0]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])   # as summarize() orders them
        n, size = len(texts), self.batch_size
        merged = GenerationResult([""] * n, 0, 0.0, [False] * n, {}, size, self.limit, [""] * n, [0] * n, [0] * n)
        position = 0
        while position < n:
            self.control.check()
            chunk = order[position:position + size]
            result = self.control.run(lambda: summarize(self.loaded, [texts[i] for i in chunk], self.settings, size,
                                                        self.limit, self.instruction, progress=False))
            size = min(size, result.batch_size or size)   # halved after an out-of-memory error, as summarize() does
            for k, i in enumerate(chunk):
                merged.summaries[i], merged.truncated[i] = result.summaries[k], result.truncated[k]
                merged.finish_reasons[i], merged.input_tokens[i] = result.finish_reasons[k], result.input_tokens[k]
                merged.generated[i] = result.generated[k]
                self.control.part(replace(parts[i], summary=result.summaries[k], input_tokens=result.input_tokens[k],
                                          generated=result.generated[k], finish_reason=result.finish_reasons[k]))
            merged.generated_tokens += result.generated_tokens
            merged.seconds += result.seconds
            merged.settings = merged.settings or result.settings
            position += len(chunk)
        merged.batch_size = size
        return merged

    @staticmethod
    def finals(origins, level: int) -> list[Part]:
        return [Part(dialogue=i, level=level, part=1, parts=1, summary="", final=True) for i in origins]


def _map_reduce(run: _Run, texts: list[str], sizes: list[int], origins: list[int], level: int):
    """One level: texts that fit and the windows of those that do not go through the engine in
    one call; the joined window summaries of each long text are reduced on the next level.
    `origins[i]` is the input dialogue text i belongs to."""
    over = [i for i, size in enumerate(sizes) if size > run.limit]
    if not over or level >= MAX_LEVELS:
        result = run.engine(texts, run.finals(origins, level))
        return result.summaries, result.truncated, [1] * len(texts)
    split = {i: split_into_windows(run.loaded, texts[i], run.limit, run.instruction) for i in over}
    fitting = [i for i in range(len(texts)) if i not in split]
    batch = [texts[i] for i in fitting] + [w for i in over for w in split[i]]
    parts = run.finals([origins[i] for i in fitting], level) + [
        Part(dialogue=origins[i], level=level, part=k + 1, parts=len(split[i]), summary="", final=False)
        for i in over for k in range(len(split[i]))]
    result = run.engine(batch, parts)
    outputs = iter(result.summaries)
    summaries = {i: next(outputs) for i in fitting}
    truncated = dict(zip(fitting, result.truncated))
    separator = " " if run.reduce == "join" else "\n"
    joined = [separator.join(s.strip() for s in (next(outputs) for _ in split[i]) if s.strip()) for i in over]
    if run.reduce == "join":
        reduced, reduced_truncated = joined, [False] * len(over)   # windows fit: nothing was cut
        if run.control is not None:
            for i, text in zip(over, joined):
                run.control.part(Part(dialogue=origins[i], level=level + 1, part=1, parts=1, summary=text,
                                      final=True))
    else:
        reduced, reduced_truncated, _ = _map_reduce(
            run, joined, input_tokens(run.loaded, joined, run.instruction), [origins[i] for i in over], level + 1)
    for i, text, flag in zip(over, reduced, reduced_truncated):
        summaries[i], truncated[i] = text, flag
    windows = [len(split[i]) if i in split else 1 for i in range(len(texts))]
    return [summaries[i] for i in range(len(texts))], [truncated[i] for i in range(len(texts))], windows
