"""CTranslate2 export: convert a Hugging Face model folder into a CTranslate2 folder that the CT2
backend (model/backends/ct2.py) loads like any model.

The folder holds CTranslate2's model.bin/config.json/vocabulary, the tokenizer files,
generation_config.json, the Hugging Face config as hf_config.json, and a run record whose
`backend` is "ctranslate2".

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
import time
from contextlib import contextmanager
from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.model.backends.ct2 import HF_CONFIG, QUANTIZATIONS


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
            raise UserError(f"CTranslate2 cannot convert {model_dir}: {first_line(exc, 400)}") from None
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
