"""The one generation engine: summarize many dialogues with any loaded model, on any backend.

Inputs are encoded by the model's family (prompt template or task prefix, cut to fit), sorted by
length (longest first, so an out-of-memory error shows up on the first batch) and batched so each
batch pads little; the backend (transformers, CTranslate2, llama.cpp: model/backends) generates
each batch and the summaries come back in the caller's order. Decoding is deterministic unless
the caller asks for (seeded) sampling: the server's temperature > 0. On a GPU an out-of-memory
error halves the batch and retries from the batch that failed (unlike accelerate's
find_executable_batch_size, finished batches are kept).

A backend may apply exact speed-ups per batch (the transformers backend: the shared-prefix KV
cache and prompt-lookup decoding, model/backends/hf.py); the result counts the batches each one
served (`speedups`).

Sharded runs (`accelerate launch --num_processes N <stage> ...`): `current_shard()` says which
process this is, `shard_indices` deals each process whole batches of the plan one process would
run (the same length order, the same batches, so every row is generated exactly as it would be
alone), and `gather_results` hands every row back to the main process in the caller's order.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace

from tqdm.auto import tqdm

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.model.loading import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION

__all__ = ["GenerationResult", "GenerationSettings", "Shard", "current_shard", "default_input_limit",
           "effective_settings", "encode", "gather_results", "input_lengths", "shard_indices", "summarize"]


@dataclass
class GenerationResult:
    summaries: list[str]
    generated_tokens: int
    seconds: float
    truncated: list[bool]
    settings: dict = field(default_factory=dict)   # the effective decoding settings
    batch_size: int | None = None         # the batch size that ran (halved after out-of-memory)
    max_input_length: int | None = None   # input tokens per dialogue, after which it was cut
    finish_reasons: list[str] = field(default_factory=list)   # "stop" | "length" per summary
    input_tokens: list[int] = field(default_factory=list)     # prompt tokens per summary (after any cut)
    generated: list[int] = field(default_factory=list)        # new tokens per summary
    speedups: dict = field(default_factory=dict)              # exact speed-up -> batches it served

    @property
    def samples_per_s(self) -> float:
        return len(self.summaries) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def timing(self) -> dict:
        return {"seconds": round(self.seconds, 3), "samples_per_s": round(self.samples_per_s, 4),
                "generated_tokens": self.generated_tokens, "tokens_per_s": round(self.tokens_per_s, 2)}


def effective_settings(loaded: LoadedModel, settings: GenerationSettings, sampling: dict | None = None) -> dict:
    """The decoding settings generation will really use, for the record. Deterministic unless
    `sampling` ({"temperature", "top_p", "seed"}) asks for sampled decoding (one beam)."""
    base = loaded.family.generation_defaults(loaded.generation_config)
    overrides = settings.overrides()
    base.update(overrides)
    if "max_new_tokens" in overrides:
        base.pop("max_length", None)
    if "min_new_tokens" in overrides:
        base.pop("min_length", None)
    base["do_sample"] = False
    if sampling:
        base.update(do_sample=True, num_beams=1, **{k: v for k, v in sampling.items() if v is not None})
    return base


def default_input_limit(loaded: LoadedModel, effective: dict) -> int:
    """Input tokens when MAX_INPUT_LENGTH is not given: the model's limit (a causal model keeps
    room for the new tokens)."""
    return loaded.family.default_input_limit(loaded.max_positions(), effective.get("max_new_tokens"))


def encode(loaded: LoadedModel, dialogue: str, instruction: str, max_input_length: int) -> tuple[list[int], bool]:
    return loaded.family.encode(loaded.tokenizer, dialogue, loaded.prompt(instruction), max_input_length)


def summarize(loaded: LoadedModel, dialogues: list[str], settings: GenerationSettings | None = None,
              batch_size: int = 8, max_input_length: int | None = None,
              instruction: str = DEFAULT_INSTRUCTION, progress: bool = True,
              sampling: dict | None = None) -> GenerationResult:
    """Summaries of `dialogues`, in order, with timing and the effective settings (`sampling`:
    see effective_settings)."""
    settings = settings or GenerationSettings()
    dialogues = list(dialogues)
    effective = effective_settings(loaded, settings, sampling)
    limit = max_input_length or default_input_limit(loaded, effective)
    encoded = [encode(loaded, d, instruction or DEFAULT_INSTRUCTION, limit) for d in dialogues]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    summaries: list[str] = [""] * len(encoded)
    reasons, counts, speedups = [""] * len(encoded), [0] * len(encoded), {}
    speedups_for = getattr(loaded.backend, "speedups_for", None)
    start, position = time.perf_counter(), 0
    bar = tqdm(total=len(encoded), unit="sample", desc=f"generate ({loaded.backend.name})", disable=not progress,
               leave=False)
    while position < len(order):
        chunk = order[position:position + batch_size]
        batch = [encoded[i][0] for i in chunk]
        used = speedups_for(loaded, batch, effective) if speedups_for else ()
        try:
            outputs = loaded.backend.generate_batch(loaded, batch, effective)
        except Exception as exc:
            if not loaded.backend.is_out_of_memory(exc) or batch_size == 1:
                raise
            loaded.backend.free_memory()
            batch_size = max(1, batch_size // 2)
            bar.write(f"out of memory: retrying with batch size {batch_size}")
            continue
        texts = loaded.tokenizer.batch_decode([o.ids for o in outputs], skip_special_tokens=True)
        for i, text, output in zip(chunk, texts, outputs):
            summaries[i], reasons[i], counts[i] = text.strip(), output.finish_reason, output.counted
        for name in used:
            speedups[name] = speedups.get(name, 0) + 1
        position += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return GenerationResult(summaries, sum(counts), time.perf_counter() - start, [t for _, t in encoded],
                            {**effective, "backend": loaded.backend.name}, batch_size, limit, reasons,
                            [len(ids) for ids, _ in encoded], counts, speedups)


# --- sharded runs (accelerate launch --num_processes N) ------------------------------------------
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


def input_lengths(loaded: LoadedModel, dialogues: list[str], instruction: str, limit: int) -> list[int]:
    """Input tokens of each dialogue as the engine encodes it (after any cut): its batching key."""
    return [len(encode(loaded, d, instruction or DEFAULT_INSTRUCTION, limit)[0]) for d in dialogues]


def shard_indices(lengths: list[int], batch_size: int, shard: Shard) -> list[int]:
    """The rows (indices, ascending) this process generates: the batches one process would form
    (longest first, `batch_size` each), dealt out whole in snake order (0 1 1 0 0 1 ...) so each
    process gets a similar share of long and short batches. The engine re-sorts a process's rows
    into exactly those batches, so a row's summary does not depend on how many processes ran."""
    if not shard.sharded:
        return list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    mine = []
    for number, start in enumerate(range(0, len(order), batch_size)):
        turn, place = divmod(number, shard.world)
        owner = place if turn % 2 == 0 else shard.world - 1 - place
        if owner == shard.rank:
            mine += order[start:start + batch_size]
    return sorted(mine)


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
        elif f.name == "speedups":
            merged[f.name] = {k: sum(v.get(k, 0) for v in values) for k in sorted(set().union(*values))}
        elif f.name == "seconds":
            merged[f.name] = seconds if seconds is not None else max(values)
        elif f.name == "batch_size":
            merged[f.name] = min((v for (idx, _), v in zip(parts, values) if idx and v), default=values[0])
        else:
            merged[f.name] = getattr(first, f.name)
    return replace(first, **merged)
