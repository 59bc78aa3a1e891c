"""Dialogues longer than the model's input budget: truncate, refuse, or summarize in windows.

`summarize_long(..., mode=...)` wraps the shared engine (generation.summarize); the mode is
LONG_INPUT, parsed once (contract/decoding.py `LongInput`):

* "truncate": the engine as is (the input is cut at MAX_INPUT_LENGTH tokens);
* "error": a UserError naming the first dialogue that does not fit;
* "chunk": a dialogue that does not fit is split into windows that fit (engine/windows.py: at
  turn, then sentence and word boundaries). Each window is summarized, the partial summaries are
  joined one per line and summarized again, recursively while the joined text is still too long
  (map-reduce). "chunk_join" stops after the windows: their summaries, in order, joined by
  spaces, are the dialogue's summary, so its length grows with the dialogue (a 5,000-word
  meeting gets a summary per window, as long abstracts of meetings do, not one short chat-style
  summary). Dialogues that fit go through the engine unchanged, so "chunk" and "truncate" give
  the same summary for every dialogue that fits.

Every level is one engine call over the texts that fit and the windows of those that do not
(the engine's sorting, batching and out-of-memory halving; its speed-ups are counted across
levels). The decoding is resolved once for all of them.

A caller that watches or stops the work (the HTTP server) passes a `Control`: `check()` runs
before every engine batch and may raise `Cancelled` (a client left, a deadline or budget ran
out); `run(call)` runs each engine batch (the server queues it behind other clients' batches);
`part(Part)` receives each window's summary as soon as its batch finishes ("part 2/5"), then the
dialogue's final summary. The control reaches the engine's loop through its per-batch hook
(generation.BatchHook), so the batches, and the summaries, are the same with or without it.

DECODING=mbr runs per window through the same engine calls (`chooser`: see generation.summarize);
the MBR cost adds up over every level, and a dialogue's `mbr_rows` entry is the choice that made
its summary (None for chunk_join: its summary is several windows' choices).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

from finetuneflow.contract.decoding import GenerationSettings, LongInput, ResolvedGeneration
from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import (BatchHook, Chooser, GenerationResult, add_totals, effective_settings,
                                            input_limit, summarize)
from finetuneflow.engine.windows import TokenCounter, input_tokens, split_into_windows
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION

__all__ = ["Cancelled", "Control", "LongGenerationResult", "MAX_LEVELS", "Part", "input_limit", "input_tokens",
           "split_into_windows", "summarize_long"]
MAX_LEVELS = 4              # map-reduce depth; beyond it the joined summaries are truncated


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
        """Run one engine batch (`call()`, which returns its GenerationResult); a server may queue
        it behind other work first."""
        return call()

    def part(self, part: Part) -> None:
        """A window's (or the final) summary, as soon as its batch has finished."""

    def sink(self, parts: list[Part]):
        """A TokenSink (engine/streaming.py) for an engine call whose text i becomes `parts[i]`:
        each part's summary streamed as it is generated; None: nothing is streamed."""
        return None


class _ControlHook(BatchHook):
    """A Control on the engine's per-batch hook: each finished row is announced as its Part."""

    def __init__(self, control: Control, parts: list[Part]):
        self.control, self.parts = control, parts

    def before(self) -> None:
        self.control.check()

    def run(self, call):
        return self.control.run(call)

    def done(self, rows: list[int], result: GenerationResult) -> None:
        for k, i in enumerate(rows):
            self.control.part(replace(self.parts[i], summary=result.summaries[k], input_tokens=result.input_tokens[k],
                                      generated=result.generated[k], finish_reason=result.finish_reasons[k]))


def _from_result(result: GenerationResult, **extra) -> LongGenerationResult:
    return LongGenerationResult(**{f.name: getattr(result, f.name) for f in fields(GenerationResult)}, **extra)


def _describe(dialogue: str, index: int, ids: list[str] | None) -> str:
    name = f"id {ids[index]!r}" if ids else f"#{index + 1}"
    return f"dialogue {name} ({dialogue[:40].strip()!r}...)"


def summarize_long(loaded: LoadedModel, dialogues: list[str],
                   settings: GenerationSettings | ResolvedGeneration | None = None, batch_size: int = 8,
                   max_input_length: int | None = None, instruction: str = DEFAULT_INSTRUCTION,
                   mode: LongInput | str = "truncate", progress: bool = True, ids: list[str] | None = None,
                   control: Control | None = None, chooser: Chooser | None = None) -> LongGenerationResult:
    """Summaries of `dialogues` in order; long ones handled by `mode` (see the module doc).
    `ids` (optional) name dialogues in errors; `control` (optional) watches and stops the work;
    `chooser`: DECODING=mbr's choice (generation.summarize)."""
    mode = LongInput.parse(mode)
    dialogues = list(dialogues)
    decoding = effective_settings(loaded, settings)
    limit = input_limit(loaded, decoding, max_input_length)
    run = _Run(loaded, decoding, batch_size, limit, instruction, progress, control, joins=mode.joins)
    run.chooser = chooser
    if control is not None:
        control.check()
    sizes = TokenCounter(loaded, instruction).input_tokens(dialogues) if mode != "truncate" and dialogues else []
    if mode == "error":
        for i, size in enumerate(sizes):
            if size > limit:
                raise UserError(f"{_describe(dialogues[i], i, ids)} needs {size} input tokens, more than "
                                f"MAX_INPUT_LENGTH={limit}; use LONG_INPUT=chunk (or truncate)")
    if not mode.windows:
        result = run.engine(dialogues, run.finals(range(len(dialogues)), level=0))
        return _from_result(result, chunked=0, windows=[1] * len(dialogues))
    start = time.perf_counter()
    summaries, truncated, windows, choices = _map_reduce(run, dialogues, sizes, list(range(len(dialogues))), level=0)
    return LongGenerationResult(summaries, run.generated, time.perf_counter() - start, truncated,
                                run.settings_used, batch_size=run.batch_size, max_input_length=limit,
                                speedups=run.speedups, mbr_rows=choices if decoding.mbr is not None else [],
                                mbr_totals=run.mbr_totals, chunked=sum(w > 1 for w in windows), windows=windows)


class _Run:
    """One summarize_long call: its resolved decoding, the control, and the totals over engine calls."""

    def __init__(self, loaded, decoding, batch_size, limit, instruction, progress, control, joins: bool):
        self.loaded, self.decoding, self.batch_size, self.limit = loaded, decoding, batch_size, limit
        self.instruction, self.progress, self.control, self.joins = instruction, progress, control, joins
        self.generated, self.settings_used, self.speedups, self.mbr_totals = 0, {}, {}, {}
        self.chooser: Chooser | None = None

    def engine(self, texts: list[str], parts: list[Part]) -> GenerationResult:
        """The engine's summaries of `texts` (one call); with a control, `parts[i]` is announced
        when text i is done."""
        hook = _ControlHook(self.control, parts) if self.control is not None else None
        sink = self.control.sink(parts) if self.control is not None else None
        result = summarize(self.loaded, texts, self.decoding, self.batch_size, self.limit, self.instruction,
                           self.progress, hook=hook, chooser=self.chooser, sink=sink)
        self.generated += result.generated_tokens
        self.settings_used = self.settings_used or result.settings
        self.batch_size = min(self.batch_size, result.batch_size or self.batch_size)
        add_totals(self.speedups, result.speedups)
        add_totals(self.mbr_totals, result.mbr_totals)
        return result

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
        return result.summaries, result.truncated, [1] * len(texts), result.mbr_rows or [None] * len(texts)
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
    choices = dict(zip(fitting, result.mbr_rows or [None] * len(fitting)))
    separator = " " if run.joins else "\n"
    joined = [separator.join(s.strip() for s in (next(outputs) for _ in split[i]) if s.strip()) for i in over]
    if run.joins:
        reduced, reduced_truncated = joined, [False] * len(over)   # windows fit: nothing was cut
        reduced_choices = [None] * len(over)                        # several windows' choices
        if run.control is not None:
            for i, text in zip(over, joined):
                run.control.part(Part(dialogue=origins[i], level=level + 1, part=1, parts=1, summary=text,
                                      final=True))
    else:
        reduced, reduced_truncated, _, reduced_choices = _map_reduce(
            run, joined, input_tokens(run.loaded, joined, run.instruction), [origins[i] for i in over], level + 1)
    for i, text, flag, choice in zip(over, reduced, reduced_truncated, reduced_choices):
        summaries[i], truncated[i], choices[i] = text, flag, choice
    windows = [len(split[i]) if i in split else 1 for i in range(len(texts))]
    order = range(len(texts))
    return [summaries[i] for i in order], [truncated[i] for i in order], windows, [choices[i] for i in order]
