"""Sharded runs (`accelerate launch --num_processes N <stage> ...`): several processes share one
generation, and every row comes out as it would in one process.

`current_shard()` says which process this is, `shard_indices` deals each process whole batches of
the plan one process would run (the same length order, the same batches, so every row is
generated exactly as it would be alone), and `gather_results` hands every row back to the main
process in the caller's order. `summarize_sharded` is the three around the long-input engine, as
the evaluation and inference stages run it.

A resumable run (the evaluation stage) passes a `BatchJournal`: the process then runs its batches
one engine call each, in the one-process plan's order, asks the journal for a batch before
generating it (a batch finished by an earlier, interrupted run comes back from there) and hands
it every batch it generates. The batches, and so the summaries, are the same either way.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, fields, replace

from tqdm.auto import tqdm

from finetuneflow.contract.decoding import GenerationSettings, LongInput
from finetuneflow.engine.generation import Chooser, GenerationResult, input_lengths
from finetuneflow.engine.long_input import LongGenerationResult, input_limit, summarize_long
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded run; Shard() is a run in one process."""
    rank: int = 0
    world: int = 1
    device: str | None = None     # the GPU accelerate gives this process (None: the caller's DEVICE)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


def current_shard(device=None) -> Shard:
    """The shard of this process: started by `accelerate launch --num_processes N` (or torchrun),
    WORLD_SIZE > 1 and accelerate joins the process group (gloo on CPUs, NCCL on GPUs); else one
    process. On GPUs each process takes its own GPU unless DEVICE names one."""
    try:
        world = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        world = 1
    if world <= 1:
        return Shard()
    import torch
    from accelerate import PartialState
    on_cpu = (str(device or "").strip().lower().startswith("cpu")) or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    return Shard(state.process_index, state.num_processes, None if on_cpu else str(state.device))


class BatchJournal:
    """Where a resumable run keeps its finished batches (see the module doc); this one keeps none."""

    def get(self, number: int, rows: list[int]) -> GenerationResult | None:
        """Batch `number` of this process (`rows`: indices into the call's dialogues), if an earlier run
        finished it; None: generate it."""
        return None

    def record(self, number: int, rows: list[int], result: GenerationResult) -> None:
        """Batch `number` is generated: `result` holds the summaries of `rows`, in that order."""


def gather_all(shard: Shard, value) -> list:
    """Every process's `value`, by rank, on every process (a collective: every process calls it)."""
    if not shard.sharded:
        return [value]
    from accelerate.utils import gather_object
    return gather_object([value])


def barrier(shard: Shard) -> None:
    """Wait until every process of a sharded run gets here."""
    if shard.sharded:
        from accelerate import PartialState
        PartialState().wait_for_everyone()


def shard_batches(lengths: list[int], batch_size: int, shard: Shard) -> list[list[int]]:
    """The batches this process generates, in the order one process would run them: the batches one
    process would form (longest first, `batch_size` each), dealt out whole in snake order
    (0 1 1 0 0 1 ...) so each process gets a similar share of long and short batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    mine = []
    for number, start in enumerate(range(0, len(order), batch_size)):
        turn, place = divmod(number, shard.world)
        owner = place if turn % 2 == 0 else shard.world - 1 - place
        if owner == shard.rank:
            mine.append(order[start:start + batch_size])
    return mine


def shard_indices(lengths: list[int], batch_size: int, shard: Shard) -> list[int]:
    """The rows (indices, ascending) this process generates: its `shard_batches`. The engine
    re-sorts a process's rows into exactly those batches, so a row's summary does not depend on how
    many processes ran."""
    if not shard.sharded:
        return list(range(len(lengths)))
    return sorted(i for batch in shard_batches(lengths, batch_size, shard) for i in batch)


def gather_results(shard: Shard, indices: list[int], result: GenerationResult, total: int,
                   seconds: float | None = None) -> GenerationResult | None:
    """Every process's rows in one result, in the caller's order, on the main process (None on the
    others). Per-row lists are put back in place; generated tokens (and chunked inputs) add up,
    `seconds` is the slowest process's (or the caller's wall clock), the batch size the smallest."""
    if not shard.sharded:
        return result
    from accelerate.utils import gather_object
    parts = gather_object([(list(indices), result)])
    if not shard.main:
        return None
    return merge_results(parts, total, seconds)


def merge_results(parts: list[tuple[list[int], GenerationResult]], total: int,
                  seconds: float | None = None) -> GenerationResult:
    """One result from the results of disjoint row sets (see gather_results)."""
    first = next((r for idx, r in parts if idx), parts[0][1])
    merged = {}
    for f in fields(first):
        values = [getattr(r, f.name) for _, r in parts]
        if isinstance(values[0], list):
            column = [None] * total
            for (indices, _), value in zip(parts, values):
                for i, v in zip(indices, value):
                    column[i] = v
            merged[f.name] = column
        elif f.name in ("generated_tokens", "chunked"):
            merged[f.name] = sum(values)
        elif f.name in ("speedups", "mbr_totals"):
            merged[f.name] = {k: sum(v.get(k, 0) for v in values) for k in sorted(set().union(*values))}
        elif f.name == "seconds":
            merged[f.name] = seconds if seconds is not None else max(values)
        elif f.name == "batch_size":
            merged[f.name] = min((v for (idx, _), v in zip(parts, values) if idx and v), default=values[0])
        else:
            merged[f.name] = getattr(first, f.name)
    return replace(first, **merged)


def summarize_sharded(loaded: LoadedModel, dialogues: list[str], settings: GenerationSettings | None,
                      batch_size: int, max_input_length: int | None, instruction: str | None,
                      long_input: LongInput | str, ids: list[str], progress: bool = True,
                      shard: Shard | None = None, chooser: Chooser | None = None,
                      journal: BatchJournal | None = None) -> LongGenerationResult | None:
    """engine.long_input.summarize_long over `dialogues`, in one process or sharded: each process
    generates its whole batches and the main process gets every row in order (the others: None).
    `chooser`: DECODING=mbr's choice (generation.summarize); `journal`: a resumable run's batches
    (see the module doc)."""
    shard = shard or Shard()
    instruction = instruction or DEFAULT_INSTRUCTION
    started = time.perf_counter()
    if journal is not None:
        limit = input_limit(loaded, settings, max_input_length)
        batches = shard_batches(input_lengths(loaded, dialogues, instruction, limit), batch_size, shard)
        run = functools.partial(summarize_long, loaded, settings=settings, batch_size=batch_size,
                                max_input_length=max_input_length, instruction=instruction, mode=long_input,
                                progress=False, chooser=chooser)
        mine, result = journaled(run, dialogues, ids, batches, journal, progress and shard.main)
        return gather_results(shard, mine, result, len(dialogues), time.perf_counter() - started)
    mine = list(range(len(dialogues)))
    if shard.sharded:
        limit = input_limit(loaded, settings, max_input_length)
        mine = shard_indices(input_lengths(loaded, dialogues, instruction, limit), batch_size, shard)
    result = summarize_long(loaded, [dialogues[i] for i in mine], settings, batch_size, max_input_length,
                            instruction, mode=long_input, progress=progress and shard.main,
                            ids=[ids[i] for i in mine], chooser=chooser)
    return gather_results(shard, mine, result, len(dialogues), time.perf_counter() - started)


def journaled(run, dialogues: list[str], ids: list[str], batches: list[list[int]], journal: BatchJournal,
              progress: bool) -> tuple[list[int], GenerationResult]:
    """This process's `batches`, each from the journal or generated by `run(texts, ids=...)` (one
    summarize_long call per batch) and handed to the journal; returns the rows (ascending) and one
    result over them in that order (seconds: the batches' own, added up)."""
    mine = sorted(i for batch in batches for i in batch)
    where = {i: k for k, i in enumerate(mine)}
    parts = []
    bar = tqdm(total=len(mine), unit="sample", desc="generate", disable=not progress, leave=False)
    for number, rows in enumerate(batches):
        result = journal.get(number, rows)
        if result is None:
            result = run([dialogues[i] for i in rows], ids=[ids[i] for i in rows])
            journal.record(number, rows, result)
        parts.append(([where[i] for i in rows], result))
        bar.update(len(rows))
    bar.close()
    if not parts:                      # a process dealt no batch
        return mine, run([], ids=[])
    return mine, merge_results(parts, len(mine), sum(r.seconds for _, r in parts))
