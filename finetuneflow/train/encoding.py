"""Training rows as token ids, through the same prompts the generation engine uses later.

The family strategy (model/family.py) owns the rule for one row: causal rows are prompt +
summary + EOS with the loss on the summary tokens only (labels carry -100 on the prompt, so EOS
stays a target even when pad == eos), the dialogue cut to fit, never the summary's EOS; seq2seq
rows are the dialogue (with the model's task prefix) and `text_target`-style labels. Nothing is
padded in `map`; a tokenized split is cached under a fingerprint of the tokenizer, prompt,
lengths and rows. Batches are padded by a dynamic collator (labels with -100).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from transformers import DataCollatorForSeq2Seq

from finetuneflow.model.family import PromptSpec, family_of

TOKENIZATION_VERSION = 3          # bump when the encoding of a row changes, so old caches are not reused
ROW_FLAGS = ("input_truncated", "target_truncated")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class EncodingSpec:
    family: str
    instruction: str
    seq2seq_prefix: str
    max_input_length: int
    max_target_length: int


def encode_example(tokenizer, spec: EncodingSpec, dialogue: str, summary: str) -> dict:
    """input_ids / attention_mask / labels for one row, plus whether input or target was cut."""
    return family_of(spec.family).training_example(tokenizer, PromptSpec(spec.instruction, spec.seq2seq_prefix),
                                                   dialogue, summary, spec.max_input_length, spec.max_target_length)


def _digest(*parts) -> str:
    """sha256 of JSON-able parts (pass lists, not datasets Columns: their str() is abbreviated)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest(type(tokenizer).__name__, vocabulary, getattr(tokenizer, "chat_template", None),
                   tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def tokenize_split(rows: datasets.Dataset, tokenizer, spec: EncodingSpec, cache_dir: Path | None,
                   name: str) -> tuple[datasets.Dataset, dict]:
    """Tokenize a split (no padding); reuse the cached result of an identical earlier run.
    Returns the dataset (input_ids, attention_mask, labels) and counts of what was cut."""
    def encode(row: dict) -> dict:
        return encode_example(tokenizer, spec, row["dialogue"], row["summary"])

    return _tokenize_cached(rows, encode, ("input_ids", "attention_mask", "labels"), ("id", "dialogue", "summary"),
                            lambda row: len(row["input_ids"]), tokenizer, spec, cache_dir, name)


def encode_pair(tokenizer, spec: EncodingSpec, dialogue: str, chosen: str, rejected: str) -> dict:
    """prompt_ids / chosen_ids / rejected_ids for one preference pair (model/family.py
    `preference_example`: the same prompt and targets as `encode_example`)."""
    return family_of(spec.family).preference_example(tokenizer, PromptSpec(spec.instruction, spec.seq2seq_prefix),
                                                     dialogue, chosen, rejected, spec.max_input_length,
                                                     spec.max_target_length)


def tokenize_pairs(pairs: datasets.Dataset, tokenizer, spec: EncodingSpec, cache_dir: Path | None,
                   name: str) -> tuple[datasets.Dataset, dict]:
    """Tokenize preference pairs (columns id, dialogue, summary = chosen, rejected, kind) like
    `tokenize_split`: prompt_ids, chosen_ids, rejected_ids, cached."""
    def encode(row: dict) -> dict:
        return encode_pair(tokenizer, spec, row["dialogue"], row["summary"], row["rejected"])

    return _tokenize_cached(pairs, encode, PAIR_COLUMNS, ("id", "dialogue", "summary", "rejected", "kind"),
                            lambda row: len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])),
                            tokenizer, spec, cache_dir, name)


def _tokenize_cached(rows: datasets.Dataset, encode, columns: tuple, keyed_by: tuple, length, tokenizer,
                     spec: EncodingSpec, cache_dir: Path | None, name: str) -> tuple[datasets.Dataset, dict]:
    """`encode` every row into `columns` (+ the cut flags), cached under a fingerprint of the
    tokenizer, the spec and the `keyed_by` columns; and the counts of what was cut."""
    if len(rows):   # a setting no row can satisfy (MAX_INPUT_LENGTH below the prompt template) fails here, once
        encode(rows[0])

    def encode_batch(batch):
        size = len(batch[keyed_by[0]])
        encoded = [encode({key: batch[key][i] for key in batch}) for i in range(size)]
        return {key: [row[key] for row in encoded] for key in (*columns, *ROW_FLAGS)}

    kwargs, reused = {}, False
    if cache_dir is not None:
        fingerprint = _digest(TOKENIZATION_VERSION, tokenizer_fingerprint(tokenizer), asdict(spec),
                              *(list(rows[column]) for column in keyed_by))
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"{name}-{fingerprint[:24]}.arrow"
        reused = cache_file.is_file()
        kwargs = {"cache_file_name": str(cache_file), "new_fingerprint": fingerprint, "load_from_cache_file": True}
    encoded = rows.map(encode_batch, batched=True, remove_columns=rows.column_names, desc=f"tokenize {name}", **kwargs)
    lengths = [length(row) for row in encoded]
    stats = {"rows": len(encoded), "truncated_dialogues": int(sum(encoded["input_truncated"])),
             "truncated_summaries": int(sum(encoded["target_truncated"])),
             "mean_tokens": round(sum(lengths) / max(1, len(lengths)), 1), "max_tokens": max(lengths, default=0),
             "cache": "reused" if reused else ("written" if cache_dir is not None else "off")}
    return encoded.remove_columns(list(ROW_FLAGS)), stats


def make_collator(tokenizer, device: torch.device) -> DataCollatorForSeq2Seq:
    """Pad each batch to its longest row (on the right, labels with -100); multiples of 8 on GPU."""
    padder = copy.deepcopy(tokenizer)
    padder.padding_side = "right"   # training pads right for both families; generation pads causal left itself
    return DataCollatorForSeq2Seq(padder, padding=True, label_pad_token_id=-100,
                                  pad_to_multiple_of=8 if device.type == "cuda" else None)
