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
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from finetuneflow.model.loading import CAUSAL, LoadedModel, max_input_tokens
from finetuneflow.model.prompts import (DEFAULT_INSTRUCTION, encode_causal_prompt, encode_seq2seq_input,
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
    batch_size: int | None = None         # the batch size that ran (halved after out-of-memory)
    max_input_length: int | None = None   # input tokens per dialogue, after which it was cut

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
    if not config.do_sample:   # sampling knobs left in a model's config only cause warnings
        config.temperature = config.top_p = config.top_k = None
    if (config.num_beams or 1) == 1:   # so do beam-only knobs under greedy decoding (no effect there)
        config.length_penalty, config.early_stopping = 1.0, False
    if loaded.family == CAUSAL:
        config.eos_token_id = stop_token_ids(loaded.tokenizer)
        config.pad_token_id = loaded.tokenizer.pad_token_id
        # transformers applies no_repeat_ngram_size to prompt + output of a decoder-only model, which
        # forbids copying any 3 tokens of the dialogue (names, "#Person1#"); _generate_batch applies
        # it to the generated tokens only.
        config.no_repeat_ngram_size = None
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def encode(loaded: LoadedModel, dialogue: str, instruction: str, max_input_length: int) -> tuple[list[int], bool]:
    if loaded.family == CAUSAL:
        return encode_causal_prompt(loaded.tokenizer, dialogue, instruction, max_input_length)
    return encode_seq2seq_input(loaded.tokenizer, dialogue, seq2seq_prefix(loaded.model.config), max_input_length)


def _generated_lengths(rows: list[list[int]], stops: set[int]) -> list[int]:
    """Tokens each row really generated: up to and including its first stop token."""
    return [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in rows]


class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """no_repeat_ngram_size over the generated tokens only (the prompt is the first
    `prompt_length` positions of every row, left-padded to the same width)."""

    def __init__(self, ngram_size: int, prompt_length: int):
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.prompt_length:], scores)


def _generate_batch(loaded: LoadedModel, batch: list[list[int]], no_repeat_ngram_size: int | None = None
                    ) -> tuple[list[str], int]:
    tokenizer = loaded.tokenizer
    padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt",
                           padding_side="left" if loaded.family == CAUSAL else "right")
    padded = {k: v.to(loaded.device) for k, v in padded.items()}
    extra = {}
    if loaded.family == CAUSAL and no_repeat_ngram_size:
        extra["logits_processor"] = LogitsProcessorList(
            [GeneratedNoRepeatNGram(no_repeat_ngram_size, padded["input_ids"].shape[1])])
    with torch.inference_mode():
        out = loaded.model.generate(**padded, **extra)
    # Causal output repeats the prompt; seq2seq output starts with the decoder start token.
    new = out[:, padded["input_ids"].shape[1]:] if loaded.family == CAUSAL else out[:, 1:]
    stops = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
    generated = sum(_generated_lengths(new.tolist(), stops))
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [t.strip() for t in texts], generated


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def default_input_limit(loaded: LoadedModel, effective: dict) -> int:
    """Input tokens when MAX_INPUT_LENGTH is not given: the model's limit; for a causal model the
    prompt and the new tokens share the context, so the new tokens are kept free."""
    limit = max_input_tokens(loaded)
    if loaded.family == CAUSAL:
        limit -= int(effective.get("max_new_tokens") or CAUSAL_DEFAULTS["max_new_tokens"])
    return limit


def summarize(loaded: LoadedModel, dialogues: list[str], settings: GenerationSettings | None = None,
              batch_size: int = 8, max_input_length: int | None = None,
              instruction: str = DEFAULT_INSTRUCTION, progress: bool = True) -> GenerationResult:
    """Summaries of `dialogues`, in order, with timing and the effective settings."""
    if getattr(loaded, "backend", "transformers") == "ct2":   # a CTranslate2 export: finetuneflow/ct2.py
        from finetuneflow.model.backends.ct2 import summarize_ct2
        return summarize_ct2(loaded, dialogues, settings, batch_size, max_input_length, instruction, progress)
    settings = settings or GenerationSettings()
    dialogues = list(dialogues)
    effective = effective_settings(loaded, settings)
    limit = max_input_length or default_input_limit(loaded, effective)
    encoded = [encode(loaded, d, instruction, limit) for d in dialogues]
    # Longest first: batches pad little, and an out-of-memory error shows up on the first batch.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    summaries: list[str] = [""] * len(encoded)
    generated_total, start, position = 0, time.perf_counter(), 0
    bar = tqdm(total=len(encoded), unit="sample", desc="generate", disable=not progress, leave=False)
    with _generation_config(loaded, effective):
        while position < len(order):
            chunk = order[position:position + batch_size]
            try:
                texts, generated = _generate_batch(loaded, [encoded[i][0] for i in chunk],
                                                   effective.get("no_repeat_ngram_size"))
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_out_of_memory(exc) or batch_size == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                batch_size = max(1, batch_size // 2)
                bar.write(f"out of memory: retrying with batch size {batch_size}")
                continue
            for i, text in zip(chunk, texts):
                summaries[i] = text
            generated_total += generated
            position += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return GenerationResult(summaries, generated_total, time.perf_counter() - start,
                            [t for _, t in encoded], effective, batch_size, limit)
