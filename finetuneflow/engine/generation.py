"""The one generation engine: summarize many dialogues with any loaded model, on any backend.

Inputs are encoded by the model's family (prompt template or task prefix, cut to fit), sorted by
length (longest first, so an out-of-memory error shows up on the first batch) and batched so each
batch pads little; the backend (transformers, CTranslate2, llama.cpp: model/backends) generates
each batch and the summaries come back in the caller's order. Decoding is deterministic unless
the caller asks for (seeded) sampling: the server's temperature > 0. On a GPU an out-of-memory
error halves the batch and retries from the batch that failed (unlike accelerate's
find_executable_batch_size, finished batches are kept).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.model.loading import LoadedModel
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION

__all__ = ["GenerationResult", "GenerationSettings", "default_input_limit", "effective_settings", "encode",
           "summarize"]


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
    reasons, counts = [""] * len(encoded), [0] * len(encoded)
    start, position = time.perf_counter(), 0
    bar = tqdm(total=len(encoded), unit="sample", desc=f"generate ({loaded.backend.name})", disable=not progress,
               leave=False)
    while position < len(order):
        chunk = order[position:position + batch_size]
        try:
            outputs = loaded.backend.generate_batch(loaded, [encoded[i][0] for i in chunk], effective)
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
        position += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return GenerationResult(summaries, sum(counts), time.perf_counter() - start, [t for _, t in encoded],
                            {**effective, "backend": loaded.backend.name}, batch_size, limit, reasons,
                            [len(ids) for ids, _ in encoded], counts)
