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

DECODING=mbr's candidates (the greedy summary, then samples from its cache): hf_candidates.py.
"""
from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from finetuneflow.contract.decoding import ResolvedGeneration
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import read_record
from finetuneflow.model.backends import Backend, CandidateBatch, Capabilities, Generated, StepCallback, finish
from finetuneflow.model.device import default_dtype, parse_device
from finetuneflow.model.family import CAUSAL, family_of
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import adapter_base, is_adapter_dir, load_config, load_tokenizer, local_or_hub
from finetuneflow.model.prompts import stop_token_ids


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def quantization_config(device: torch.device):
    import transformers
    compute = default_dtype(device) if device.type == "cuda" else torch.float32
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def disable_cpu_bf16_kernels(model: torch.nn.Module) -> int:
    """bitsandbytes' CPU bf16 path stops 4-bit training silently after a no-grad forward."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _is_quantized_checkpoint(config) -> bool:
    return bool(getattr(config, "quantization_config", None))


def load_transformers(name: str, *, adapter: str | None = None, load_in_4bit: bool = False, device=None, dtype=None,
                      trust_remote_code: bool = False, allow_unsafe_weights: bool = False,
                      for_training: bool = False, base_model: str | None = None) -> LoadedModel:
    """Load `name` (Hub id, model folder, merged folder, or an adapter folder) for either family.
    An adapter folder is recognised by its adapter_config.json; its base comes from its run record
    (train_bart_lora.py), else adapter_config.json, unless `base_model` is given."""
    device = parse_device(device)
    requested = name
    if adapter is None and is_adapter_dir(name):
        adapter = str(resolve(name))
        name = base_model or adapter_base(adapter)
    base = local_or_hub(name)
    if adapter and not Path(base).exists() and (base.startswith(("/", ".", "~")) or Path(base).suffix):
        raise UserError(f"base model {base} of adapter {adapter} not found; restore it, or pass "
                        f"--BASE_MODEL=<its id or folder>")
    config = load_config(base, trust_remote_code)
    family = family_of(config)
    if adapter:
        _check_adapter_fits(adapter, base, config)
    if _is_quantized_checkpoint(config) and not load_in_4bit and (Path(base) / "config.json").is_file():
        method = config.quantization_config.get("quant_method", "?")
        raise UserError(f"{base} holds already-quantized weights ({method}); "
                        f"load it with --LOAD_IN_4BIT=True, or use the full-precision model it was made from")
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    auto = AutoModelForSeq2SeqLM if family.auto_class == "AutoModelForSeq2SeqLM" else AutoModelForCausalLM
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_unsafe_weights else True}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    else:
        kwargs["dtype"] = dtype or (torch.float32 if for_training and device.type == "cpu" else default_dtype(device))
    try:
        model = auto.from_pretrained(base, **kwargs)
    except Exception as exc:   # OSError, ValueError, SafetensorError (truncated file), unpickling refused, ...
        raise UserError(f"cannot load model {name!r}: {first_line(exc, 300)}; check the folder "
                        f"(config.json + model.safetensors) or re-create it") from None
    if load_in_4bit and device.type == "cpu":
        disable_cpu_bf16_kernels(model)
    elif not load_in_4bit:
        model.to(device)
    tokenizer_source = adapter if adapter and any(
        (Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else base
    tokenizer = load_tokenizer(tokenizer_source, family, config, trust_remote_code)
    record_folder = Path(adapter or base)
    record = read_record(record_folder) if record_folder.is_dir() else None
    if adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
        except Exception as exc:   # shapes or module names that do not match the base
            raise UserError(f"adapter {adapter} does not fit base {base}: {first_line(exc, 240)}; pass the base it "
                            f"was trained on with --BASE_MODEL") from None
    if not for_training:
        model.eval()
    dtype_name = "4-bit nf4" if load_in_4bit else str(next(model.parameters()).dtype).replace("torch.", "")
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, backend=BACKEND, name=str(requested),
                       base=name, adapter=adapter, device=device, dtype=dtype_name, config=model.config,
                       generation_config=unwrap(model).generation_config, record=record)


def _check_adapter_fits(adapter: str, base: str, config) -> None:
    """An adapter trained on another architecture merges into a no-op: refuse it up front."""
    import json
    try:
        adapter_config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{adapter}/adapter_config.json is unreadable ({type(exc).__name__}); re-train or restore "
                        f"the adapter") from None
    task = adapter_config.get("task_type")
    family = family_of(config)
    if task and task != family.lora_task_type:
        raise UserError(f"adapter {adapter} is a {task} adapter but base {base} is a {family} model; pass the base it "
                        f"was trained on with --BASE_MODEL")


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


class TransformersBackend(Backend):
    name = "transformers"
    capabilities = Capabilities(beams=True, sampling=True, exact_speedups=True, training=True, precision=True)

    def detect(self, path: Path) -> bool:
        return True

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.cuda.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())

    def free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load(self, source, *, device=None, dtype=None, **options) -> LoadedModel:
        return load_transformers(source, device=device, dtype=dtype, **options)

    def speedups_for(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration) -> tuple:
        return speedups_for(loaded, batch, decoding)

    def generate_batch(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                       on_step: StepCallback | None = None) -> list[Generated]:
        out, padded = run_generate(loaded, batch, decoding)
        return new_rows(loaded, out, padded["input_ids"].shape[1], decoding)

    def generate_candidates(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                            seeds: list[int]) -> CandidateBatch:
        from finetuneflow.model.backends.hf_candidates import generate_candidates
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
