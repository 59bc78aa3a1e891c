"""The one generation engine: summarize many dialogues with any loaded model, on any backend.

Inputs are encoded by the model's family (prompt template or task prefix, cut to fit), sorted by
length (longest first, so an out-of-memory error shows up on the first batch) and batched so each
batch pads little; the backend (transformers, CTranslate2, llama.cpp: model/backends) generates
each batch and the summaries come back in the caller's order. The decoding is resolved once per
call (`effective_settings`: the request over the model family's defaults, typed) and handed to
the backend as it is. Decoding is deterministic unless the caller asks for (seeded) sampling: the
server's temperature > 0. On a GPU an out-of-memory error halves the batch and retries from the
batch that failed (unlike accelerate's find_executable_batch_size, finished batches are kept).

A caller that watches, queues or reports each batch (long inputs, the server) passes a
`BatchHook`: `before()` runs before every batch (it may raise to stop the work), `run(call)` runs
the batch (`call()` returns that batch's own GenerationResult), `done(rows, result)` hears which
rows it finished. The batches are the same with or without a hook, so are the summaries.

DECODING=mbr is a candidates mode of the same loop: each batch asks the backend for every row's
candidates (`Backend.generate_candidates`: the greedy summary and the samples, the prompt encoded
once per row) and the caller's `chooser` (quality/mbr.py `choose_rows`: the engine is below the
quality layer) picks each row's summary. The result carries each row's choice (`mbr_rows`) and
the cost over every batch (`mbr_totals`: candidates' tokens, greedy / samples / selection seconds).

A backend may apply exact speed-ups per batch (the transformers backend: the shared-prefix KV
cache and prompt-lookup decoding, model/backends/hf.py); the result counts the batches each one
served (`speedups`). Sharded runs (several processes): engine/sharding.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from finetuneflow.contract.decoding import GenerationSettings, ResolvedGeneration, Sampling
from finetuneflow.engine.streaming import TextStream, TokenSink
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, stop_token_ids

__all__ = ["BatchHook", "Choice", "Chooser", "GenerationResult", "GenerationSettings", "MBR_TOTALS",
           "default_input_limit", "effective_settings", "encode", "input_limit", "input_lengths", "summarize"]
# summed over batches (and engine calls, and the processes of a sharded run) under DECODING=mbr
MBR_TOTALS = ("rows", "candidates", "dropped", "all_flagged", "unchecked", "candidate_tokens", "greedy_tokens",
              "greedy_seconds", "sample_seconds", "selection_seconds")


@dataclass(frozen=True)
class Choice:
    """The candidate MBR chose for one row, and what its faithfulness filter did."""
    index: int                   # 0: the greedy summary; 1..N: the samples
    dropped: int = 0             # candidates dropped as unfaithful
    all_flagged: bool = False    # every candidate was flagged, so all were kept
    checked: bool = True         # the faithfulness check ran (off, or not validated for this length: False)


# (mbr, sources, candidates of each row) -> a Choice per row; sources: the texts the rows summarize
Chooser = Callable[[object, list[str], list[list[str]]], list[Choice]]


@dataclass
class GenerationResult:
    summaries: list[str]
    generated_tokens: int
    seconds: float
    truncated: list[bool]
    settings: dict = field(default_factory=dict)   # the effective decoding settings, as records show them
    batch_size: int | None = None         # the batch size that ran (halved after out-of-memory)
    max_input_length: int | None = None   # input tokens per dialogue, after which it was cut
    finish_reasons: list[str] = field(default_factory=list)   # "stop" | "length" per summary
    input_tokens: list[int] = field(default_factory=list)     # prompt tokens per summary (after any cut)
    generated: list[int] = field(default_factory=list)        # new tokens per summary
    speedups: dict = field(default_factory=dict)              # exact speed-up -> batches it served
    mbr_rows: list = field(default_factory=list)              # DECODING=mbr: per row its choice and cost (a dict)
    mbr_totals: dict = field(default_factory=dict)            # DECODING=mbr: MBR_TOTALS over every batch

    @property
    def samples_per_s(self) -> float:
        return len(self.summaries) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def timing(self) -> dict:
        return {"seconds": round(self.seconds, 3), "samples_per_s": round(self.samples_per_s, 4),
                "generated_tokens": self.generated_tokens, "tokens_per_s": round(self.tokens_per_s, 2)}


class BatchHook:
    """What a caller may do around each engine batch (see the module doc); the defaults do nothing."""

    def before(self) -> None:
        """Called before every batch; raise to stop the work."""

    def run(self, call):
        """Run one batch: `call()` generates it and returns its GenerationResult."""
        return call()

    def done(self, rows: list[int], result: GenerationResult) -> None:
        """`result` holds the summaries of `rows` (indices into the call's dialogues), in that order."""


def effective_settings(loaded: LoadedModel, settings: GenerationSettings | ResolvedGeneration | None = None,
                       sampling: Sampling | dict | None = None) -> ResolvedGeneration:
    """The decoding generation will really use: `settings` over the model family's defaults
    (model/family.py), deterministic unless `sampling` ({"temperature", "top_p", "seed"}) asks
    for sampled decoding (one beam). Already resolved settings come back as they are."""
    if isinstance(settings, ResolvedGeneration):
        if sampling:
            raise ValueError("resolved settings carry their own sampling; resolve them with it")
        return settings
    if isinstance(sampling, dict):
        sampling = Sampling.from_dict(sampling)
    return loaded.family.resolve_generation(loaded.generation_config, settings, sampling)


def default_input_limit(loaded: LoadedModel, decoding: ResolvedGeneration) -> int:
    """Input tokens when MAX_INPUT_LENGTH is not given: the model's limit (a causal model keeps
    room for the new tokens)."""
    return loaded.family.default_input_limit(loaded.max_positions(), decoding.max_new)


def input_limit(loaded: LoadedModel, settings: GenerationSettings | ResolvedGeneration | None,
                max_input_length: int | None) -> int:
    """MAX_INPUT_LENGTH, else the engine's default (the model's limit, less the new tokens of a
    causal model): where the engine truncates, and so where long-input windows are cut."""
    return max_input_length or default_input_limit(loaded, effective_settings(loaded, settings))


def encode(loaded: LoadedModel, dialogue: str, instruction: str, max_input_length: int) -> tuple[list[int], bool]:
    return loaded.family.encode(loaded.tokenizer, dialogue, loaded.prompt(instruction), max_input_length)


def input_lengths(loaded: LoadedModel, dialogues: list[str], instruction: str, limit: int) -> list[int]:
    """Input tokens of each dialogue as the engine encodes it (after any cut): its batching key."""
    return [len(encode(loaded, d, instruction or DEFAULT_INSTRUCTION, limit)[0]) for d in dialogues]


def _stepper(loaded: LoadedModel, rows: list[int], sink: TokenSink | None):
    """The backend's on_step for one batch (None: nobody streams or stops rows) and each wanted
    row's TextStream (by position in the batch)."""
    if sink is None or not loaded.backend.capabilities.token_streaming:
        return None, {}
    stops = set(stop_token_ids(loaded.tokenizer)) | {loaded.tokenizer.pad_token_id}
    streams = {k: TextStream(loaded.tokenizer, stops) for k, i in enumerate(rows) if sink.wants(i)}

    def on_step(k: int, token: int) -> bool:
        if sink.stopped(rows[k]):
            return True
        stream = streams.get(k)
        if stream is not None:
            piece = stream.push(token)
            if piece:
                sink.text(rows[k], piece)
        return False
    return on_step, streams


def _stream_rest(sink: TokenSink | None, rows: list[int], streams: dict, texts: list[str]) -> None:
    """Each wanted row's text past what was streamed (all of it where nothing was)."""
    if sink is None:
        return
    for k, i in enumerate(rows):
        if not sink.wants(i):
            continue
        stream = streams.get(k)
        piece = stream.finish(texts[k]) if stream is not None else texts[k]
        if piece:
            sink.text(i, piece)


def _one_batch(loaded: LoadedModel, encoded: list, rows: list[int], decoding: ResolvedGeneration,
               limit: int, record: dict, sink: TokenSink | None = None) -> GenerationResult:
    """The backend's summaries of `rows` (one batch), as a result of their own; a `sink` hears
    each row's text as its tokens come (engine/streaming.py)."""
    batch = [encoded[i][0] for i in rows]
    used = loaded.backend.speedups_for(loaded, batch, decoding)
    on_step, streams = _stepper(loaded, rows, sink)
    start = time.perf_counter()
    if on_step is not None:
        outputs = loaded.backend.generate_batch(loaded, batch, decoding, on_step=on_step)
    else:
        outputs = loaded.backend.generate_batch(loaded, batch, decoding)
    texts = [t.strip() for t in loaded.tokenizer.batch_decode([o.ids for o in outputs], skip_special_tokens=True)]
    _stream_rest(sink, rows, streams, texts)
    counts = [o.counted for o in outputs]
    return GenerationResult(texts, sum(counts), time.perf_counter() - start,
                            [encoded[i][1] for i in rows], record, len(rows), limit, [o.finish_reason for o in outputs],
                            [len(ids) for ids in batch], counts, dict.fromkeys(used, 1))


def _candidate_batch(loaded: LoadedModel, encoded: list, rows: list[int], decoding: ResolvedGeneration, limit: int,
                     record: dict, sources: list[str], chooser: Chooser,
                     sink: TokenSink | None = None) -> GenerationResult:
    """DECODING=mbr: the backend's candidates of `rows` (one batch) and the chooser's summaries."""
    batch = [encoded[i][0] for i in rows]
    used = loaded.backend.speedups_for(loaded, batch, decoding.greedy_part())
    start = time.perf_counter()
    made = loaded.backend.generate_candidates(loaded, batch, decoding, [decoding.mbr.row_seed(ids) for ids in batch])
    texts = [[t.strip() for t in loaded.tokenizer.batch_decode([g.ids for g in row], skip_special_tokens=True)]
             for row in made.rows]
    chosen_at = time.perf_counter()
    choices = chooser(decoding.mbr, [sources[i] for i in rows], texts)
    selection = time.perf_counter() - chosen_at
    picked = [row[c.index] for row, c in zip(made.rows, choices)]
    mbr_rows = [{"choice": c.index, "candidates": len(row), "dropped": c.dropped, "all_flagged": c.all_flagged,
                 "checked": c.checked, "candidate_tokens": sum(g.counted for g in row), "greedy_tokens": row[0].counted}
                for row, c in zip(made.rows, choices)]
    totals = {"rows": len(rows), "candidates": sum(r["candidates"] for r in mbr_rows),
              "dropped": sum(c.dropped for c in choices), "all_flagged": sum(c.all_flagged for c in choices),
              "unchecked": sum(not c.checked for c in choices),
              "candidate_tokens": sum(r["candidate_tokens"] for r in mbr_rows),
              "greedy_tokens": sum(r["greedy_tokens"] for r in mbr_rows), "greedy_seconds": made.greedy_seconds,
              "sample_seconds": made.sample_seconds, "selection_seconds": selection}
    counts = [g.counted for g in picked]
    summaries = [t[c.index] for t, c in zip(texts, choices)]
    _stream_rest(sink, rows, {}, summaries)       # chosen once every candidate is done: one piece
    return GenerationResult(summaries, sum(counts), time.perf_counter() - start,
                            [encoded[i][1] for i in rows], record, len(rows), limit, [g.finish_reason for g in picked],
                            [len(ids) for ids in batch], counts, dict.fromkeys(used, 1), mbr_rows, totals)


def add_totals(into: dict, totals: dict) -> dict:
    """`totals` (MBR_TOTALS) added into `into`, key by key."""
    for key, value in totals.items():
        into[key] = into.get(key, 0) + value
    return into


def summarize(loaded: LoadedModel, dialogues: list[str],
              settings: GenerationSettings | ResolvedGeneration | None = None, batch_size: int = 8,
              max_input_length: int | None = None, instruction: str = DEFAULT_INSTRUCTION, progress: bool = True,
              sampling: Sampling | dict | None = None, hook: BatchHook | None = None,
              chooser: Chooser | None = None, sink: TokenSink | None = None) -> GenerationResult:
    """Summaries of `dialogues`, in order, with timing and the effective settings (`sampling`:
    see effective_settings; `hook`: see the module doc; `chooser`: picks a row's summary among
    its candidates under DECODING=mbr, quality/mbr.py `choose_rows`; `sink`: hears each summary's
    text as it is generated, engine/streaming.py)."""
    decoding = effective_settings(loaded, settings, sampling)
    if decoding.mbr is not None and chooser is None:
        raise ValueError("DECODING=mbr needs a chooser (quality/mbr.py choose_rows) to pick each row's summary")
    hook = hook or BatchHook()
    dialogues = list(dialogues)
    limit = input_limit(loaded, decoding, max_input_length)
    encoded = [encode(loaded, d, instruction or DEFAULT_INSTRUCTION, limit) for d in dialogues]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    record = {**decoding.as_record(), "backend": loaded.backend.name}
    out = GenerationResult([""] * len(encoded), 0, 0.0, [t for _, t in encoded], record, batch_size, limit,
                           [""] * len(encoded), [len(ids) for ids, _ in encoded], [0] * len(encoded))
    start, position = time.perf_counter(), 0
    bar = tqdm(total=len(encoded), unit="sample", desc=f"generate ({loaded.backend.name})", disable=not progress,
               leave=False)
    while position < len(order):
        hook.before()
        rows = order[position:position + batch_size]
        if decoding.mbr is not None:
            call = lambda: _candidate_batch(loaded, encoded, rows, decoding, limit, record, dialogues, chooser,  # noqa: E731
                                                  sink)
        else:
            call = lambda: _one_batch(loaded, encoded, rows, decoding, limit, record, sink)  # noqa: E731
        try:
            batch = hook.run(call)
        except Exception as exc:
            if not loaded.backend.is_out_of_memory(exc) or batch_size == 1:
                raise
            loaded.backend.free_memory()
            batch_size = max(1, batch_size // 2)
            bar.write(f"out of memory: retrying with batch size {batch_size}")
            continue
        for k, i in enumerate(rows):
            out.summaries[i], out.finish_reasons[i], out.generated[i] = (batch.summaries[k], batch.finish_reasons[k],
                                                                         batch.generated[k])
        add_totals(out.speedups, batch.speedups)
        if batch.mbr_rows:
            out.mbr_rows = out.mbr_rows or [None] * len(encoded)
            for k, i in enumerate(rows):
                out.mbr_rows[i] = batch.mbr_rows[k]
            add_totals(out.mbr_totals, batch.mbr_totals)
        hook.done(rows, batch)
        position += len(rows)
        bar.update(len(rows))
    bar.close()
    out.generated_tokens, out.seconds, out.batch_size = sum(out.generated), time.perf_counter() - start, batch_size
    return out
