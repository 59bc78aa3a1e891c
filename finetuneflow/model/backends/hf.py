"""The transformers backend: base models, adapters (PEFT), merged folders, 4-bit (bitsandbytes).

Anything the other backends do not claim is a transformers model (a Hub id, a model folder, an
adapter folder). Generation runs `model.generate()` on a padded batch with the engine's effective
settings applied to a copy of the model's generation config for the duration of the batch.

Precision (`--precision=auto|fp32|bf16` on the stages that generate): `resolve_precision` picks the
weights' dtype. On a GPU, auto keeps bf16 (fp16 where bf16 is missing). On a CPU, bf16 needs the
CPU's own bf16 instructions (avx512_bf16 / amx_bf16, detected by `cpu_bf16_feature`); auto takes
bf16 there only for the families whose measured quality did not change (`AUTO_CPU_BF16`, see
BENCHMARKS.md, "Generation"), else fp32.

Exact speed-ups for one batch (`speedups_for`, used only where they leave the greedy tokens as
they are and were measured faster): a causal batch reuses the KV cache of the prompt prefix its
rows share (the chat template, system prompt and instruction: computed once, kept per model), and
a single greedy causal row uses prompt-lookup decoding (draft tokens copied from the dialogue,
verified in one forward pass; transformers' `prompt_lookup_num_tokens`).
"""
from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import read_record
from finetuneflow.model.backends import Backend, Generated, finish
from finetuneflow.model.family import CAUSAL, family_of
from finetuneflow.model.loading import (LoadedModel, adapter_base, is_adapter_dir, load_config, load_tokenizer,
                                        local_or_hub)
from finetuneflow.model.prompts import stop_token_ids


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_device(device) -> torch.device:
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"DEVICE={device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={device!r} but no CUDA GPU is available here; use --DEVICE=cpu or leave it unset")
    return parsed


# --- precision ---------------------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_SPEC = "[auto | fp32 | bf16]"
# Families for which `auto` takes bf16 on a CPU with bf16 instructions: only where the measured
# quality did not change (BENCHMARKS.md, "Generation": SmolLM2, 100 held-out DialogSum rows).
AUTO_CPU_BF16: frozenset[str] = frozenset()
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_feature() -> str | None:
    """The CPU instruction set that runs bf16 natively (avx512_bf16, amx_bf16, ARM bf16), or None:
    without one, bf16 matmuls are emulated and slower than fp32."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        capabilities = {}
    found = sorted(name for name, present in capabilities.items() if present and "bf16" in name)
    if found:
        return "amx_bf16" if "amx_bf16" in found else found[0]
    try:   # older torch: the kernel's own flags
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


@dataclass(frozen=True)
class Precision:
    """The weights' precision a stage asked for and the one it runs with, and why."""
    requested: str          # auto | fp32 | bf16
    used: str               # fp32 | bf16 | fp16 | 4-bit nf4 | the runtime's own (a .gguf's q8_0, ...)
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.used)

    def as_dict(self) -> dict:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def _check_requested(requested: str) -> str:
    name = str(requested or "auto").strip().lower()
    if name not in PRECISIONS:
        raise UserError(f"--precision={requested!r} is not one of {', '.join(PRECISIONS)}")
    return name


def resolve_precision(requested: str, device=None, family: str | None = None,
                      load_in_4bit: bool = False) -> Precision:
    """The dtype to load a transformers model in (see the module doc). `--precision=bf16` where
    the hardware has no bf16 is one clear error; only `auto` falls back."""
    requested, device = _check_requested(requested), parse_device(device)
    if load_in_4bit:
        if requested != "auto":
            raise UserError(f"--precision={requested} applies to full-precision weights but LOAD_IN_4BIT=True loads "
                            f"4-bit weights; pass --load_in_4bit=false, or drop --precision")
        return Precision(requested, "4-bit nf4", "LOAD_IN_4BIT=True (4-bit weights, bitsandbytes)")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "bf16" and not native:
            raise UserError(f"--precision=bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; "
                            f"use --precision=auto (fp16 here) or fp32")
        if requested == "auto":
            used = "bf16" if default_dtype(device) == torch.bfloat16 else "fp16"
            return Precision(requested, used, f"auto on a GPU: {used}")
        return Precision(requested, requested, f"--precision={requested}")
    feature = cpu_bf16_feature()
    if requested == "bf16":
        if feature is None:
            raise UserError("--precision=bf16: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16), so bf16 "
                            "would be emulated and slower; use --precision=fp32 (or auto)")
        return Precision(requested, "bf16", f"--precision=bf16 ({feature})")
    if requested == "fp32":
        return Precision(requested, "fp32", "--precision=fp32")
    if feature is None:
        return Precision(requested, "fp32", "auto: this CPU has no bf16 instructions")
    if family in AUTO_CPU_BF16:
        return Precision(requested, "bf16", f"auto: {feature}, and bf16 kept {family} summaries' quality")
    return Precision(requested, "fp32", f"auto: fp32 for {family or 'this'} models on a CPU (bf16 changed the "
                                        f"greedy summaries; pass --precision=bf16 for speed)")


def precision_for(model: str, requested: str, device=None, load_in_4bit: bool = False) -> Precision:
    """The precision to load `model` (a Hub id, folder or file) with: resolve_precision for a
    transformers model; a CTranslate2 or GGUF export runs in the precision it was written in."""
    from finetuneflow.model.backends import backend_for
    requested = _check_requested(requested)
    path = resolve(model)
    backend = backend_for(path) if path.exists() else BACKEND
    if backend.name != BACKEND.name:
        if requested != "auto":
            raise UserError(f"{model} is a {backend.name} model: its precision was fixed when it was exported; "
                            f"drop --precision={requested} (or export it again)")
        return Precision(requested, "runtime", f"{backend.name} runs the precision it was exported in")
    family = None
    try:
        base = adapter_base(model) if is_adapter_dir(model) else model
        family = str(family_of(load_config(base)))
    except UserError:
        pass   # the loader reports an unreadable model with its own message
    return resolve_precision(requested, device, family, load_in_4bit)


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


@contextmanager
def generation_config_for(loaded: LoadedModel, effective: dict):
    """Apply the effective settings to a copy of the model's generation config for one call:
    passing max_new_tokens next to a config that sets max_length makes transformers warn on every
    batch, so the superseded length limits are cleared on the copy."""
    model = unwrap(loaded.model)
    saved = model.generation_config
    config = copy.deepcopy(saved)
    for key, value in effective.items():
        if key not in ("backend", "seed"):
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


def speedups_for(loaded: LoadedModel, batch: list[list[int]], effective: dict) -> tuple[str, ...]:
    """The exact speed-ups one batch gets (the rule measured in BENCHMARKS.md, "Generation"):
    causal models, one beam; prompt lookup for a single greedy row on a PROMPT_LOOKUP_DEVICES device
    (transformers drafts for one row only), else the shared-prefix KV cache when the rows share >=
    MIN_SHARED_PREFIX tokens.
    Seq2seq models get neither: their encoder reads the whole input at once and the decoder's
    prompt holds no dialogue to copy from."""
    if not getattr(_enabled, "value", True) or loaded.family != CAUSAL or not batch:
        return ()
    if (effective.get("num_beams") or 1) != 1:
        return ()
    device = getattr(loaded.device, "type", str(loaded.device))
    if len(batch) == 1 and not effective.get("do_sample") and device in PROMPT_LOOKUP_DEVICES:
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
            cache = output.get(_cache_argument(loaded))
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


def _cache_argument(loaded: LoadedModel) -> str:
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


class TransformersBackend(Backend):
    name = "transformers"

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

    def speedups_for(self, loaded: LoadedModel, batch: list[list[int]], effective: dict) -> tuple[str, ...]:
        return speedups_for(loaded, batch, effective)

    def generate_batch(self, loaded: LoadedModel, batch: list[list[int]], effective: dict) -> list[Generated]:
        tokenizer = loaded.tokenizer
        speedups, extra = speedups_for(loaded, batch, effective), {}
        cache = None
        if "prefix_cache" in speedups:
            prefix = _store(loaded).find(batch)
            cache = _prefix_cache(loaded, batch[0][:prefix], len(batch))
        if cache is not None:
            padded = _pad_after_prefix(batch, prefix, tokenizer.pad_token_id)
            extra[_cache_argument(loaded)] = cache
        else:
            padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt", padding_side=loaded.family.padding_side)
        padded = {k: v.to(loaded.device) for k, v in padded.items()}
        width = padded["input_ids"].shape[1]
        if "prompt_lookup" in speedups:
            extra["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
        if loaded.family == CAUSAL and effective.get("no_repeat_ngram_size"):
            extra["logits_processor"] = LogitsProcessorList(
                [GeneratedNoRepeatNGram(effective["no_repeat_ngram_size"], width)])
        if effective.get("do_sample") and effective.get("seed") is not None:
            torch.manual_seed(int(effective["seed"]))   # seeded sampling repeats
        with generation_config_for(loaded, effective), torch.inference_mode():
            out = loaded.model.generate(**padded, **extra)
        if loaded.family == CAUSAL:
            _store(loaded).last_row = list(batch[-1])
        new = loaded.family.new_tokens(out, width)
        stops = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
        return finish(new.tolist(), stops, effective.get("max_new_tokens"))

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
