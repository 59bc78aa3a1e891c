"""CTranslate2: convert a model folder, load the result like any model, summarize with it.

CTranslate2 runs BART/T5 (its `Translator`) and decoder-only models (its `Generator`) on CPU with
int8 weights, which is the fast CPU path that exists for seq2seq models (llama.cpp has no BART).

A CT2 folder written here holds CTranslate2's model.bin/config.json/vocabulary, the tokenizer
files, generation_config.json, the Hugging Face config as hf_config.json, and a run_config.json
whose `"backend": "ctranslate2"` marks it. `models.load_model` hands such a folder to
`load_ct2`, and `generation.summarize` hands the result to `summarize_ct2`, so every stage that
loads and summarizes (inference, the HTTP service, evaluation) accepts a CT2 folder unchanged.

Conversion fixes what ctranslate2's converter does not handle by itself:
* `BartConfig.normalize_before` no longer exists in transformers 5: BART is post-norm, so it is
  set to False (the converter reads it);
* vocabulary vs `vocab_size`: the vocabulary is padded with unused tokens when the embedding
  matrix is larger than the tokenizer (resized embeddings), and truncated by the converter when
  it is smaller (bart-large-cnn: 50264 rows, 50265 tokens);
* transformers 5 T5 configs say `tie_word_embeddings=True` always and keep the output scaling in
  `scale_decoder_outputs`; the converter scales by the former, so it is given the latter;
* a model without a BOS token (CT2's config needs a string) gets its EOS token there.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.model.loading import CAUSAL, SEQ2SEQ, LoadedModel, fix_tokenizer
from finetuneflow.contract.paths import resolve

BACKEND = "ctranslate2"
HF_CONFIG = "hf_config.json"
QUANTIZATIONS = ("int8", "int8_float32", "float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16")
CPU_QUANTIZATIONS = ("int8", "int8_float32", "float32")


def is_ct2_dir(path) -> bool:
    """A folder with CTranslate2's model.bin (a Hugging Face config.json always has model_type)."""
    folder = resolve(str(path))
    if not (folder / "model.bin").is_file():
        return False
    config = folder / "config.json"
    try:
        return not config.is_file() or "model_type" not in json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False


# ---------------------------------------------------------------------------------------------
# conversion

@contextmanager
def _vocabulary_padding(config_class_name: str):
    """Swap the converter's loader for one that pads the vocabulary up to the embedding rows."""
    from ctranslate2.converters import transformers as ct2_transformers
    loaders = ct2_transformers._MODEL_LOADERS
    original = loaders.get(config_class_name)
    if original is None:
        yield
        return

    class Padded(type(original)):
        padded = 0

        def get_vocabulary(self, model, tokenizer):
            tokens = super().get_vocabulary(model, tokenizer)
            rows = model.get_input_embeddings().weight.shape[0]
            if len(tokens) < rows:
                Padded.padded = rows - len(tokens)
                tokens = tokens + [f"<ftf_unused_{i}>" for i in range(len(tokens), rows)]
            return tokens

    loaders[config_class_name] = Padded()
    try:
        yield Padded
    finally:
        loaders[config_class_name] = original


def _converter_class():
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            config = model.config
            if getattr(config, "model_type", "") == "bart":
                try:
                    config.normalize_before
                except AttributeError:   # removed in transformers 5; BART is post-layer-norm
                    config.normalize_before = False
            if hasattr(config, "scale_decoder_outputs"):
                # transformers 5 T5 always reports tie_word_embeddings=True and keeps the old meaning
                # (scale the decoder output by d_model**-0.5) in scale_decoder_outputs, while the
                # converter still reads tie_word_embeddings; lm_head is copied on its own either way
                config.tie_word_embeddings = bool(config.scale_decoder_outputs)
            return model

    return Converter


def convert_to_ct2(model_dir: Path, out_dir: Path, quantization: str) -> dict:
    """Convert the Hugging Face folder `model_dir` into `out_dir` (replacing what is there)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    if quantization not in QUANTIZATIONS:
        raise UserError(f"QUANTIZATION={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    with _vocabulary_padding(type(config).__name__) as padded:
        try:
            _converter_class()(str(model_dir)).convert(str(out_dir), quantization=quantization, force=True)
        except (ValueError, NotImplementedError) as exc:   # unsupported architecture or option
            message = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
            raise UserError(f"CTranslate2 cannot convert {model_dir}: {message}") from None
    ct2_config_path = out_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text(encoding="utf-8"))
    if ct2_config.get("bos_token") is None:   # CT2 needs a string; a model without BOS never uses it
        ct2_config["bos_token"] = ct2_config.get("eos_token")
        atomic_write_json(ct2_config_path, ct2_config)
    tokenizer.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out_dir)
    atomic_write_json(out_dir / HF_CONFIG, config.to_dict())
    rows = getattr(config, "vocab_size", None)
    return {"quantization": quantization, "seconds": round(time.perf_counter() - start, 2),
            "vocabulary": {"model_vocab_size": rows, "tokenizer_size": len(tokenizer),
                           "padded_tokens": getattr(padded, "padded", 0) if padded else 0,
                           "truncated_tokens": max(0, len(tokenizer) - rows) if rows else 0},
            "bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())}


# ---------------------------------------------------------------------------------------------
# loading: an object the shared engine and the stage scripts treat like a LoadedModel

class CT2Model:
    """Holds the CTranslate2 runtime plus what the engine reads from a transformers model
    (`config`, `generation_config`); it has no torch parameters."""

    def __init__(self, folder: Path, family: str, config, generation_config, device: str, compute_type: str):
        import ctranslate2
        self.folder, self.family = folder, family
        self.config, self.generation_config = config, generation_config
        threads = int(os.environ.get("FTF_CT2_THREADS", "0"))   # 0 = CTranslate2's default
        runtime = ctranslate2.Translator if family == SEQ2SEQ else ctranslate2.Generator
        self.runtime = runtime(str(folder), device=device, compute_type=compute_type, intra_threads=threads)
        self.compute_type = self.runtime.compute_type

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def parameters(self):
        return iter(())

    def __repr__(self) -> str:
        return f"CT2Model({self.folder}, {self.family}, compute_type={self.compute_type})"


@dataclass
class CT2LoadedModel(LoadedModel):
    backend: str = "ct2"


def _hf_config(folder: Path):
    from transformers import AutoConfig
    data = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def load_ct2(name, device=None, compute_type: str = "default") -> CT2LoadedModel:
    """Load a CT2 folder written by `export_gguf.py --FORMAT=ct2`."""
    import ctranslate2
    from transformers import AutoTokenizer, GenerationConfig
    folder = resolve(str(name))
    missing = [f for f in (HF_CONFIG, "tokenizer_config.json") if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} is a CTranslate2 model without {', '.join(missing)}; re-export it with "
                        f"`python export_gguf.py --FORMAT=ct2` so it carries its tokenizer and config")
    run_config = json.loads((folder / "run_config.json").read_text(encoding="utf-8")) \
        if (folder / "run_config.json").is_file() else None
    config = _hf_config(folder)
    family = SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL
    wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ct2_device = "cuda" if wanted.type == "cuda" and ctranslate2.get_cuda_device_count() > 0 else "cpu"
    generation = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() \
        else GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_tokenizer(tokenizer, family, config)
    model = CT2Model(folder, family, config, generation, ct2_device, compute_type)
    return CT2LoadedModel(model, tokenizer, family, str(folder), None, torch.device(ct2_device), run_config)


# ---------------------------------------------------------------------------------------------
# generation through the shared engine's encoding and settings

def _options(loaded: CT2LoadedModel, effective: dict) -> dict:
    """The engine's effective settings in CTranslate2's terms."""
    options = {"beam_size": int(effective.get("num_beams") or 1),
               "no_repeat_ngram_size": int(effective.get("no_repeat_ngram_size") or 0),
               "length_penalty": float(effective.get("length_penalty") if effective.get("length_penalty") is not None else 1.0),
               "sampling_topk": 1}
    if loaded.family == CAUSAL:
        options["max_length"] = int(effective.get("max_new_tokens") or 128)
        options["min_length"] = int(effective.get("min_new_tokens") or 0)
        return options
    # transformers counts the decoder start token in max_length/min_length; CT2 does not
    max_new = effective.get("max_new_tokens") or max(1, (effective.get("max_length") or 256) - 1)
    min_new = effective.get("min_new_tokens")
    if min_new is None:
        min_new = max(0, (effective.get("min_length") or 0) - 1)
    options.update(max_decoding_length=int(max_new), min_decoding_length=int(min_new), max_input_length=0)
    return options


def _token(tokenizer, token_id) -> str | None:
    return None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))


def _run_batch(loaded: CT2LoadedModel, batch: list[list[int]], options: dict) -> list[tuple[list[int], int]]:
    """(token ids without the end token, tokens generated as the transformers engine counts them:
    up to and including the first stop token, which transformers also emits when it forces EOS)."""
    from finetuneflow.model.prompts import stop_token_ids
    tokenizer, runtime = loaded.tokenizer, loaded.model.runtime
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in batch]
    if loaded.family == CAUSAL:
        stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
        results = runtime.generate_batch(tokens, include_prompt_in_result=False, end_token=stops, **options)
        rows = [list(r.sequences_ids[0]) for r in results]
        return [(ids, len(ids) + (len(ids) < options["max_length"])) for ids in rows]
    generation = loaded.model.generation_config
    forced_bos = _token(tokenizer, getattr(generation, "forced_bos_token_id", None))
    prefix = [[forced_bos] for _ in tokens] if forced_bos else None
    eos = _token(tokenizer, generation.eos_token_id if not isinstance(generation.eos_token_id, list)
                 else generation.eos_token_id[0])
    forced_eos = getattr(generation, "forced_eos_token_id", None) is not None
    if forced_eos:
        # transformers forces EOS (log-prob 0) as the last of max_length tokens: the same as stopping
        # one token earlier, which also ranks beams that reach the limit the same way
        options = {**options, "max_decoding_length": max(1, options["max_decoding_length"] - 1)}
    results = runtime.translate_batch(tokens, target_prefix=prefix, end_token=eos, **options)
    rows = [tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results]
    return [(ids, len(ids) + (forced_eos or len(ids) < options["max_decoding_length"])) for ids in rows]


def summarize_ct2(loaded: CT2LoadedModel, dialogues: list[str], settings=None, batch_size: int = 8,
                  max_input_length: int | None = None, instruction: str | None = None, progress: bool = True):
    """`generation.summarize` for a CT2 model: same encoding, settings, order and result type."""
    from tqdm.auto import tqdm
    from finetuneflow.engine.generation import (GenerationResult, GenerationSettings, default_input_limit,
                                         effective_settings, encode)
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    settings = settings or GenerationSettings()
    dialogues = list(dialogues)
    effective = effective_settings(loaded, settings)
    limit = max_input_length or default_input_limit(loaded, effective)
    encoded = [encode(loaded, d, instruction or DEFAULT_INSTRUCTION, limit) for d in dialogues]
    options = _options(loaded, effective)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    summaries: list[str] = [""] * len(encoded)
    generated_total, start = 0, time.perf_counter()
    bar = tqdm(total=len(encoded), unit="sample", desc="generate (ct2)", disable=not progress, leave=False)
    for position in range(0, len(order), batch_size):
        chunk = order[position:position + batch_size]
        outputs = _run_batch(loaded, [encoded[i][0] for i in chunk], options)
        for i, (ids, generated) in zip(chunk, outputs):
            summaries[i] = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
            generated_total += generated
        bar.update(len(chunk))
    bar.close()
    effective = {**effective, "backend": BACKEND, "compute_type": loaded.model.compute_type}
    return GenerationResult(summaries, generated_total, time.perf_counter() - start,
                            [t for _, t in encoded], effective, batch_size, limit)


def token_log_probs(loaded: CT2LoadedModel, inputs: dict) -> list[float]:
    """Teacher-forced log-probabilities, aligned with a transformers model's on the same inputs:
    causal: every token after the first of `input_ids`; seq2seq: every token of `labels`."""
    tokenizer, runtime = loaded.tokenizer, loaded.model.runtime
    source = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    if loaded.family == CAUSAL:
        return list(runtime.score_batch([source])[0].log_probs)
    labels = inputs["labels"][0].tolist()
    eos = loaded.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    target = labels[:-1] if labels and labels[-1] == eos else labels   # CT2 appends the end token itself
    scores = list(runtime.score_batch([source], [tokenizer.convert_ids_to_tokens(target)])[0].log_probs)
    return scores[:len(labels)]

