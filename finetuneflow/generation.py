"""The one generation engine: summarize many dialogues with any loaded model, fast.

Inputs are sorted by length (longest first, so an out-of-memory error shows up on the first
batch) and batched so each batch pads little; summaries come back in the caller's order.
Decoding is deterministic (no sampling). Causal models get the shared prompt (see prompts.py),
left padding and stop on EOS / end-of-turn; seq2seq models keep their generation config except
for the settings the caller overrides. On a GPU an out-of-memory error halves the batch and
retries it.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from finetuneflow.models import CAUSAL, LoadedModel, max_input_tokens
from finetuneflow.prompts import (DEFAULT_INSTRUCTION, encode_causal_prompt, encode_seq2seq_input,
                                  seq2seq_prefix, stop_token_ids)

CAUSAL_DEFAULTS = {"num_beams": 1, "max_new_tokens": 128}


@dataclass
class GenerationSettings:
    """Decoding settings; `None` keeps the model's own generation config."""
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> "GenerationSettings":
        return cls(**{name: cfg.get(name.upper()) for name in cls.__dataclass_fields__})

    def overrides(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class GenerationResult:
    summaries: list[str]
    generated_tokens: int
    seconds: float
    truncated: list[bool]
    settings: dict = field(default_factory=dict)   # the effective decoding settings

    @property
    def samples_per_s(self) -> float:
        return len(self.summaries) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def timing(self) -> dict:
        return {"seconds": round(self.seconds, 3), "samples_per_s": round(self.samples_per_s, 4),
                "generated_tokens": self.generated_tokens, "tokens_per_s": round(self.tokens_per_s, 2)}


def effective_settings(loaded: LoadedModel, settings: GenerationSettings) -> dict:
    """The decoding settings generate() will really use, for the record."""
    config = loaded.model.generation_config
    base = dict(CAUSAL_DEFAULTS) if loaded.family == CAUSAL else {
        "num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens,
        "max_length": config.max_length, "min_length": config.min_length,
        "no_repeat_ngram_size": config.no_repeat_ngram_size, "length_penalty": config.length_penalty}
    base.update(settings.overrides())
    if "max_new_tokens" in settings.overrides():
        base.pop("max_length", None)
    if "min_new_tokens" in settings.overrides():
        base.pop("min_length", None)
    base["do_sample"] = False
    return base


@contextmanager
def _generation_config(loaded: LoadedModel, effective: dict):
    """Apply the effective settings to the model's generation config for the duration of a
    call: passing max_new_tokens next to a config that sets max_length makes transformers warn
    on every batch, so the superseded length limits are cleared on a copy."""
    model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    saved = model.generation_config
    config = copy.deepcopy(saved)
    for key, value in effective.items():
        setattr(config, key, value)
    if effective.get("max_new_tokens") is not None:
        config.max_length = None
    if effective.get("min_new_tokens") is not None:
        config.min_length = None
    if loaded.family == CAUSAL:
        config.eos_token_id = stop_token_ids(loaded.tokenizer)
        config.pad_token_id = loaded.tokenizer.pad_token_id
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def encode(loaded: LoadedModel, dialogue: str, instruction: str, max_input_length: int) -> tuple[list[int], bool]:
    if loaded.family == CAUSAL:
        return encode_causal_prompt(loaded.tokenizer, dialogue, instruction, max_input_length)
    return encode_seq2seq_input(loaded.tokenizer, dialogue, seq2seq_prefix(loaded.model.config), max_input_length)


def _generate_batch(loaded: LoadedModel, batch: list[list[int]]) -> tuple[list[str], int]:
    tokenizer = loaded.tokenizer
    padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt",
                           padding_side="left" if loaded.family == CAUSAL else "right")
    padded = {k: v.to(loaded.device) for k, v in padded.items()}
    with torch.inference_mode():
        out = loaded.model.generate(**padded)
    new = out[:, padded["input_ids"].shape[1]:] if loaded.family == CAUSAL else out
    stops = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
    generated = 0
    for row in new.tolist():
        generated += next((i for i, t in enumerate(row) if t in stops and i > 0), len(row))
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [t.strip() for t in texts], generated


def summarize(loaded: LoadedModel, dialogues: list[str], settings: GenerationSettings | None = None,
              batch_size: int = 8, max_input_length: int | None = None,
              instruction: str = DEFAULT_INSTRUCTION, progress: bool = True) -> GenerationResult:
    """Summaries of `dialogues`, in order, with timing and the effective settings."""
    settings = settings or GenerationSettings()
    limit = max_input_length or max_input_tokens(loaded)
    encoded = [encode(loaded, d, instruction, limit) for d in dialogues]
    effective = effective_settings(loaded, settings)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    summaries: list[str] = [""] * len(encoded)
    generated_total, start, position = 0, time.perf_counter(), 0
    bar = tqdm(total=len(encoded), unit="sample", desc="generate", disable=not progress, leave=False)
    with _generation_config(loaded, effective):
        while position < len(order):
            chunk = order[position:position + batch_size]
            try:
                texts, generated = _generate_batch(loaded, [encoded[i][0] for i in chunk])
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                batch_size = max(1, batch_size // 2)
                bar.write(f"out of GPU memory: retrying with batch size {batch_size}")
                continue
            for i, text in zip(chunk, texts):
                summaries[i] = text
            generated_total += generated
            position += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return GenerationResult(summaries, generated_total, time.perf_counter() - start,
                            [t for _, t in encoded], effective)
