"""The transformers backend: base models, adapters (PEFT), merged folders, 4-bit (bitsandbytes).

Anything the other backends do not claim is a transformers model (a Hub id, a model folder, an
adapter folder). Generation runs `model.generate()` on a padded batch with the engine's resolved
decoding applied to a copy of the model's generation config for the duration of the batch. The
dtype to load in comes from model/precision.py (`--precision`), the device from model/device.py.

Exact speed-ups for one batch (`speedups_for`, used only where they leave the greedy tokens as
they are and were measured faster): a causal batch reuses the KV cache of the prompt prefix its
rows share (the chat template, system prompt and instruction: computed once, kept per model), and
a single greedy causal row uses prompt-lookup decoding (draft tokens copied from the dialogue,
verified in one forward pass; transformers' `prompt_lookup_num_tokens`).

DECODING=mbr's candidates (`generate_candidates`): the greedy summary exactly as generate_batch
makes it, then the samples from its KV cache (or encoder output): the prompt is read once per row.
Each sample draws from its own generator (`SampleCandidates`, model/backends/sampling.py), so a
row's samples depend on its seed only. Loading: hf_loading.py.
"""
from __future__ import annotations

import copy
import time
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor, StoppingCriteria,
                          StoppingCriteriaList)
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutput

from finetuneflow.contract.decoding import ResolvedGeneration
from finetuneflow.model.backends import Backend, CandidateBatch, Capabilities, Generated, StepCallback, finish
from finetuneflow.model.backends.hf_loading import disable_cpu_bf16_kernels as disable_cpu_bf16_kernels
from finetuneflow.model.backends.hf_loading import load_transformers
from finetuneflow.model.backends.hf_loading import parameter_count as parameter_count
from finetuneflow.model.backends.hf_loading import quantization_config as quantization_config
from finetuneflow.model.backends.hf_loading import unwrap
from finetuneflow.model.backends.sampling import CandidateDraws
from finetuneflow.model.family import CAUSAL
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.prompts import stop_token_ids


def _config_values(decoding: ResolvedGeneration) -> dict:
    """The resolved decoding as GenerationConfig attributes (None: the model's own stays)."""
    values = {"num_beams": decoding.num_beams, "max_new_tokens": decoding.max_new_tokens,
              "min_new_tokens": decoding.min_new_tokens, "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
              "length_penalty": decoding.length_penalty, "max_length": decoding.max_length,
              "min_length": decoding.min_length}
    values = {k: v for k, v in values.items() if v is not None}
    values["do_sample"] = decoding.do_sample
    if decoding.sampling is not None:   # the seed seeds torch before generate() instead
        values.update({k: v for k, v in decoding.sampling.as_dict().items() if k != "seed"})
    return values


@contextmanager
def generation_config_for(loaded: LoadedModel, decoding: ResolvedGeneration):
    """Apply the resolved decoding to a copy of the model's generation config for one call:
    passing max_new_tokens next to a config that sets max_length makes transformers warn on every
    batch, so the superseded length limits are cleared on the copy."""
    model = unwrap(loaded.model)
    saved = model.generation_config
    config = copy.deepcopy(saved)
    for key, value in _config_values(decoding).items():
        setattr(config, key, value)
    if decoding.max_new_tokens is not None:
        config.max_length = None
    if decoding.min_new_tokens is not None:
        config.min_length = None
    if not config.do_sample:   # sampling knobs left in a model's config only cause warnings
        config.temperature = config.top_p = config.top_k = None
    if (config.num_beams or 1) == 1:   # so do beam-only knobs under greedy decoding (no effect there)
        config.length_penalty, config.early_stopping = 1.0, False
    if loaded.family == CAUSAL:
        config.eos_token_id = stop_token_ids(loaded.tokenizer)
        config.pad_token_id = loaded.tokenizer.pad_token_id
        # transformers applies no_repeat_ngram_size to prompt + output of a decoder-only model, which
        # forbids copying any 3 tokens of the dialogue (names, "#Person1#"); generate_batch applies it
        # to the generated tokens only (GeneratedNoRepeatNGram).
        config.no_repeat_ngram_size = None
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """no_repeat_ngram_size over the generated tokens only (the prompt is the first
    `prompt_length` positions of every row, left-padded to the same width)."""

    def __init__(self, ngram_size: int, prompt_length: int):
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.prompt_length:], scores)


# --- exact speed-ups ---------------------------------------------------------------------------
PROMPT_LOOKUP_TOKENS = 10     # draft tokens copied from the prompt per step (transformers' default n-gram of 2)
MIN_SHARED_PREFIX = 16        # a shorter shared prefix is not worth a cache
MAX_SHARED_PREFIX = 256       # the longest prefix kept (a template + instruction is well under it)
PREFIX_SLOTS = 4              # prefixes kept per model (e.g. a few instructions on one server)
# Prompt lookup only where decoding is memory-bound (GPUs): measured 0.93x plain generate on this
# project's 2-core CPU (SmolLM2, one row at a time, identical tokens; BENCHMARKS.md, "Generation").
PROMPT_LOOKUP_DEVICES = frozenset({"cuda"})
_enabled = threading.local()


@contextmanager
def exact_speedups(enabled: bool):
    """Turn the exact speed-ups off (or on) in this thread for a while: the benchmark's plain
    generate() runs, and the tests comparing against it."""
    saved = getattr(_enabled, "value", True)
    _enabled.value = enabled
    try:
        yield
    finally:
        _enabled.value = saved


class _PrefixStore:
    """Per model: the KV caches of the last few shared prompt prefixes, and the last row seen (so a
    single request finds the prefix it shares with the one before)."""

    def __init__(self):
        self.caches: OrderedDict[tuple, object] = OrderedDict()
        self.last_row: list[int] | None = None
        self.supported = True
        self.lock = threading.Lock()

    def find(self, batch: list[list[int]]) -> int:
        """Tokens of the longest usable prefix every row shares (with a stored prefix, with each
        other, or, for one row, with the last row seen); 0 when none is worth it."""
        room = min(len(row) for row in batch) - 1     # every row keeps a token to prefill
        stored = max((len(key) for key in self.caches
                      if len(key) <= room and all(tuple(row[:len(key)]) == key for row in batch)), default=0)
        rows = batch if len(batch) > 1 else batch + ([self.last_row] if self.last_row else [])
        common = min(_common_prefix(rows) if len(rows) > 1 else 0, room, MAX_SHARED_PREFIX)
        # a longer new prefix costs its tokens once; it pays when the rows would recompute more
        length = common if common > stored and (not stored or len(batch) * (common - stored) > common) else stored
        return length if length >= MIN_SHARED_PREFIX and self.supported else 0


def _common_prefix(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(row) for row in rows)
    for i in range(n):
        token = first[i]
        if any(row[i] != token for row in rows):
            return i
    return n


_STORES: "weakref.WeakKeyDictionary[torch.nn.Module, _PrefixStore]" = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def _store(loaded: LoadedModel) -> _PrefixStore:
    with _STORES_LOCK:
        if loaded.model not in _STORES:
            _STORES[loaded.model] = _PrefixStore()
        return _STORES[loaded.model]


def speedups_for(loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration) -> tuple[str, ...]:
    """The exact speed-ups one batch gets (the rule measured in BENCHMARKS.md, "Generation"):
    causal models, one beam; prompt lookup for a single greedy row on a PROMPT_LOOKUP_DEVICES device
    (transformers drafts for one row only), else the shared-prefix KV cache when the rows share >=
    MIN_SHARED_PREFIX tokens.
    Seq2seq models get neither: their encoder reads the whole input at once and the decoder's
    prompt holds no dialogue to copy from."""
    if not getattr(_enabled, "value", True) or loaded.family != CAUSAL or not batch:
        return ()
    if decoding.num_beams != 1:
        return ()
    device = getattr(loaded.device, "type", str(loaded.device))
    if len(batch) == 1 and not decoding.do_sample and device in PROMPT_LOOKUP_DEVICES:
        return ("prompt_lookup",)
    return ("prefix_cache",) if _store(loaded).find(batch) else ()


def _prefix_cache(loaded: LoadedModel, prefix: list[int], rows: int):
    """A fresh cache holding `prefix`'s keys and values for `rows` rows (computed once per model)."""
    store, key = _store(loaded), tuple(prefix)
    with store.lock:
        cache = store.caches.get(key)
        if cache is None:
            with torch.inference_mode():
                output = loaded.model(input_ids=torch.tensor([prefix], device=loaded.device), use_cache=True,
                                      logits_to_keep=1)
            cache = output.get(cache_argument(loaded))
            if not all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None])):
                store.supported = False   # sliding windows, linear attention, ...: not reusable this way
                return None
            store.caches[key] = cache
            while len(store.caches) > PREFIX_SLOTS:
                store.caches.popitem(last=False)
        store.caches.move_to_end(key)
        copied = copy.deepcopy(cache)
    if rows > 1:
        copied.batch_repeat_interleave(rows)
    return copied


def cache_argument(loaded: LoadedModel) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (earlier 5.x): the name generate() and
    the model's outputs use for the KV cache."""
    import inspect
    return "cache" if "cache" in inspect.signature(unwrap(loaded.model).forward).parameters else "past_key_values"


def _pad_after_prefix(batch: list[list[int]], prefix: int, pad_id: int) -> dict:
    """Rows as prefix + left padding + the rest: the cached prefix keeps its positions 0..prefix-1
    in every row; the rest's positions continue from it (position ids follow the mask)."""
    width = max(len(row) for row in batch)
    ids, mask = [], []
    for row in batch:
        gap = width - len(row)
        ids.append(row[:prefix] + [pad_id] * gap + row[prefix:])
        mask.append([1] * prefix + [0] * gap + [1] * (len(row) - prefix))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def prepare_batch(loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration) -> tuple[dict, dict, int]:
    """One batch's padded inputs and generate() arguments (its exact speed-ups, the causal n-gram
    rule), and the padded prompt width."""
    tokenizer = loaded.tokenizer
    speedups, extra = speedups_for(loaded, batch, decoding), {}
    cache = None
    if "prefix_cache" in speedups:
        prefix = _store(loaded).find(batch)
        cache = _prefix_cache(loaded, batch[0][:prefix], len(batch))
    if cache is not None:
        padded = _pad_after_prefix(batch, prefix, tokenizer.pad_token_id)
        extra[cache_argument(loaded)] = cache
    else:
        padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt", padding_side=loaded.family.padding_side)
    padded = {k: v.to(loaded.device) for k, v in padded.items()}
    width = padded["input_ids"].shape[1]
    if "prompt_lookup" in speedups:
        extra["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
    if loaded.family == CAUSAL and decoding.no_repeat_ngram_size:
        extra["logits_processor"] = LogitsProcessorList([GeneratedNoRepeatNGram(decoding.no_repeat_ngram_size, width)])
    return padded, extra, width


def run_generate(loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration, **more):
    """generate() on one batch with the resolved decoding: (its output, the padded inputs it ran on).
    `more`: further generate() arguments (return_dict_in_generate, encoder_outputs, ...)."""
    padded, extra, width = prepare_batch(loaded, batch, decoding)
    if decoding.sampling is not None and decoding.sampling.seed is not None:
        torch.manual_seed(int(decoding.sampling.seed))   # seeded sampling repeats
    with generation_config_for(loaded, decoding), torch.inference_mode():
        out = loaded.model.generate(**padded, **extra, **more)
    if loaded.family == CAUSAL:
        _store(loaded).last_row = list(batch[-1])
    return out, padded


def new_rows(loaded: LoadedModel, sequences, width: int, decoding: ResolvedGeneration) -> list[Generated]:
    """generate()'s output rows as Generated (cut at the first stop token)."""
    tokenizer = loaded.tokenizer
    new = loaded.family.new_tokens(sequences, width)
    stops = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
    return finish(new.tolist(), stops, decoding.max_new_tokens)


# --- token streaming ---------------------------------------------------------------------------
class RowStreamer(BaseStreamer):
    """generate()'s streamer for a whole batch: each step's tokens (one per row) go to
    `on_step(row, token)`; a row whose callback returns True is stopped (`RowsStopped`). The
    first put() is the prompt (a decoder-only model's input ids, a seq2seq model's decoder start):
    not generated, so not passed on. Prompt lookup puts several tokens of one row at once."""

    def __init__(self, on_step: StepCallback):
        self.on_step = on_step
        self.prompt_seen = False
        self.stopped: set[int] = set()

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        columns = value[:, None] if value.dim() == 1 else value
        for row, tokens in enumerate(columns.tolist()):
            if row in self.stopped:
                continue
            for token in tokens:
                if self.on_step(row, int(token)):
                    self.stopped.add(row)
                    break

    def end(self) -> None:
        pass


class RowsStopped(StoppingCriteria):
    """Finishes the rows the streamer's callback stopped (their client left); the others go on."""

    def __init__(self, streamer: RowStreamer):
        self.streamer = streamer

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.streamer.stopped:
            done[list(self.streamer.stopped)] = True
        return done


def streaming_arguments(decoding: ResolvedGeneration, on_step: StepCallback | None) -> dict:
    """generate() arguments that stream each row's tokens to `on_step` (beam search cannot: its
    rows are only final at the end, so it streams nothing and the engine sends the text whole)."""
    if on_step is None or decoding.num_beams != 1:
        return {}
    streamer = RowStreamer(on_step)
    return {"streamer": streamer, "stopping_criteria": StoppingCriteriaList([RowsStopped(streamer)])}


# --- DECODING=mbr's candidates --------------------------------------------------------------------
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
    """DECODING=mbr: the greedy summary and `decoding.mbr.samples` seeded samples of each row.

    1. The greedy summary: the batch runs exactly as `generate_batch` runs it (its padding, its
       exact speed-ups), so the first candidate is the greedy summary itself. A seq2seq model's
       encoder runs here once (generate() gets its output); a causal generate() returns its cache.
    2. The samples: the prompt part of that KV cache (cut to the prompt less its last token, fed
       again to give the first sampled token's logits) is repeated for each row's samples with
       `batch_repeat_interleave`, or the encoder output is repeated; one generate() call then
       decodes every row's samples from it (`SampleCandidates`). No prompt is read twice."""
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


class TransformersBackend(Backend):
    name = "transformers"
    capabilities = Capabilities(beams=True, sampling=True, token_streaming=True, exact_speedups=True, training=True,
                                precision=True)

    def detect(self, path: Path) -> bool:
        return True

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.cuda.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())

    def free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load(self, source, *, device=None, dtype=None, **options) -> LoadedModel:
        return load_transformers(source, backend=self, device=device, dtype=dtype, **options)

    def speedups_for(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration) -> tuple:
        return speedups_for(loaded, batch, decoding)

    def generate_batch(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                       on_step: StepCallback | None = None) -> list[Generated]:
        out, padded = run_generate(loaded, batch, decoding, **streaming_arguments(decoding, on_step))
        return new_rows(loaded, out, padded["input_ids"].shape[1], decoding)

    def generate_candidates(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                            seeds: list[int]) -> CandidateBatch:
        return generate_candidates(loaded, batch, decoding, seeds)

    def logits(self, loaded: LoadedModel, prompt_ids: list[int], target_ids: list[int]):
        """Causal: logits at every position of prompt + target; seq2seq: decoder logits per target."""
        if loaded.family == CAUSAL:
            inputs = {"input_ids": torch.tensor([prompt_ids + target_ids])}
        else:
            inputs = {"input_ids": torch.tensor([prompt_ids]), "labels": torch.tensor([target_ids])}
        with torch.inference_mode():
            out = loaded.model(**{k: v.to(loaded.device) for k, v in inputs.items()})
        return out.logits[0].float().cpu().numpy()

    def token_log_probs(self, loaded: LoadedModel, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        logits = torch.from_numpy(self.logits(loaded, prompt_ids, target_ids))
        log_probs = torch.log_softmax(logits, -1)
        if loaded.family == CAUSAL:
            start = len(prompt_ids) - 1
            rows = log_probs[start:start + len(target_ids)]
        else:
            rows = log_probs[:len(target_ids)]
        return rows.gather(-1, torch.tensor(target_ids)[:, None])[:, 0].tolist()


BACKEND = TransformersBackend()
