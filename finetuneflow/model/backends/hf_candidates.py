"""DECODING=mbr's candidates on the transformers backend, with the prompt encoded once per row.

1. The greedy summary: the batch runs exactly as `generate_batch` runs it (its padding, its exact
   speed-ups), so the first candidate is the greedy summary itself. A seq2seq model's encoder runs
   here once (generate() gets its output instead of running it again); a causal model's
   generate() returns its KV cache.
2. The samples: the prompt part of that KV cache (cut to the prompt less its last token, which is
   fed again to give the first sampled token's logits) is repeated for each row's samples with
   `batch_repeat_interleave`, or the encoder output is repeated; one generate() call then decodes
   every row's `samples` candidates from it. No prompt is read a second time.

Sampling is done by `SampleCandidates`, a logits processor that draws each candidate's token from
that candidate's own generator (model/backends/sampling.py) and leaves generate() to pick it
greedily, so a row's samples depend on its seed only, not on the other rows of its batch.
"""
from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from finetuneflow.contract.decoding import ResolvedGeneration
from finetuneflow.model.backends import CandidateBatch
from finetuneflow.model.backends.hf import (GeneratedNoRepeatNGram, cache_argument, generation_config_for, new_rows,
                                            run_generate, unwrap)
from finetuneflow.model.backends.sampling import CandidateDraws
from finetuneflow.model.family import CAUSAL
from finetuneflow.model.loaded import LoadedModel


class SampleCandidates(LogitsProcessor):
    """Turn each row's scores into its sampled token (every other token -inf), drawn with the
    row's own generator; generate() then decodes greedily, which keeps exactly that token."""

    def __init__(self, draws: CandidateDraws):
        self.draws = draws

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        picked = self.draws.draw(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked[:, None], 0.0)


def encode_once(loaded: LoadedModel, batch: list[list[int]]) -> BaseModelOutput:
    """A seq2seq batch's encoder output, computed as generate() computes it."""
    padded = loaded.tokenizer.pad({"input_ids": batch}, return_tensors="pt", padding_side=loaded.family.padding_side)
    padded = {k: v.to(loaded.device) for k, v in padded.items()}
    with torch.inference_mode():
        return unwrap(loaded.model).get_encoder()(**padded, return_dict=True)


def generate_candidates(loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                        seeds: list[int]) -> CandidateBatch:
    """The greedy summary and `decoding.mbr.samples` seeded samples of each row (see the module doc)."""
    greedy = decoding.greedy_part()
    started = time.perf_counter()
    shared = {} if loaded.family == CAUSAL else {"encoder_outputs": encode_once(loaded, batch)}
    out, padded = run_generate(loaded, batch, greedy, return_dict_in_generate=True, **shared)
    rows = new_rows(loaded, out.sequences, padded["input_ids"].shape[1], greedy)
    greedy_seconds = time.perf_counter() - started
    samples = _samples(loaded, decoding, seeds, out, padded, shared)
    n = decoding.mbr.samples
    return CandidateBatch([[row] + samples[k * n:(k + 1) * n] for k, row in enumerate(rows)], greedy_seconds,
                          time.perf_counter() - started - greedy_seconds)


def _samples(loaded: LoadedModel, decoding: ResolvedGeneration, seeds: list[int], out, padded: dict, shared: dict):
    """Every row's samples, rows in order, from the greedy call's cache or encoder output
    (`padded`: the inputs the greedy call ran on, its cached prefix's layout included)."""
    mbr, greedy = decoding.mbr, decoding.greedy_part()
    n, width = mbr.samples, padded["input_ids"].shape[1]
    extra = {}
    if loaded.family == CAUSAL:
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        cache.crop(-(cache.get_seq_length() - (width - 1)))      # the prompt less its last token
        cache.batch_repeat_interleave(n)
        extra[cache_argument(loaded)] = cache
    else:
        hidden = shared["encoder_outputs"].last_hidden_state
        extra["encoder_outputs"] = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n, dim=0))
    inputs = {k: v.repeat_interleave(n, dim=0) for k, v in padded.items()}
    processors = []
    if loaded.family == CAUSAL and decoding.no_repeat_ngram_size:
        processors.append(GeneratedNoRepeatNGram(decoding.no_repeat_ngram_size, width))
    processors.append(SampleCandidates(CandidateDraws(seeds, n, mbr.temperature, mbr.top_p)))
    with generation_config_for(loaded, greedy), torch.inference_mode():
        sequences = loaded.model.generate(**inputs, **extra, logits_processor=LogitsProcessorList(processors))
    return new_rows(loaded, sequences, width, greedy)
