"""Facts about model architectures, read from a config (a transformers config object or a plain
dict such as config.json or GGUF-derived metadata). No torch import: the planner and the GGUF
tools use these without loading a model.

One table of default LoRA targets serves both the trainer (which knows the model's linear
modules) and the planner (which may know only the model type).
"""
from __future__ import annotations

from typing import Any, Iterable

SEQ2SEQ, CAUSAL = "seq2seq", "causal"
MAX_SANE_LENGTH = 1_000_000   # tokenizers without a limit report ~1e30
T5_TYPES = ("t5", "mt5", "umt5")   # the seq2seq model types llama.cpp runs from a GGUF (BART it cannot)

# Default LoRA targets, first match wins. Seq2seq: BART-style attention projections (the seed's
# q_proj/v_proj) or T5's q/v. Causal: Llama-style q/k/v/o, Phi-3's fused qkv, GPT-2's c_attn,
# GPT-NeoX/Falcon's query_key_value.
LORA_TARGETS = {
    SEQ2SEQ: (("q_proj", "v_proj"), ("q", "v")),
    CAUSAL: (("q_proj", "k_proj", "v_proj", "o_proj"), ("qkv_proj", "o_proj"), ("c_attn",), ("query_key_value",)),
}
_BY_MODEL_TYPE = {"t5": ("q", "v"), "mt5": ("q", "v"), "umt5": ("q", "v"), "longt5": ("q", "v"),
                  "phi3": ("qkv_proj", "o_proj"), "gpt2": ("c_attn",), "gpt_neox": ("query_key_value",),
                  "falcon": ("query_key_value",)}


def get(config: Any, *names: str, default=None):
    """The first of `names` the config has (attribute or key) and is not None."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


def family_name(config: Any) -> str:
    """"seq2seq" for encoder-decoder models, else "causal" (from the config, never the name)."""
    return SEQ2SEQ if get(config, "is_encoder_decoder", default=False) else CAUSAL


def model_type(config: Any) -> str:
    return str(get(config, "model_type", default="?"))


def max_positions(config: Any) -> int | None:
    """Positions the model can attend to, when its config says."""
    value = get(config, "max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")
    return int(value) if value and int(value) < MAX_SANE_LENGTH else None


def hidden_size(config: Any) -> int:
    return int(get(config, "hidden_size", "d_model", "n_embd", default=0))


def num_layers(config: Any) -> int:
    """Decoder + encoder layers."""
    decoder = int(get(config, "num_hidden_layers", "decoder_layers", "num_decoder_layers", "n_layer", "num_layers",
                      default=0))
    encoder = int(get(config, "encoder_layers", default=0)) or (
        int(get(config, "num_layers", default=0)) if family_name(config) == SEQ2SEQ and
        get(config, "num_decoder_layers") is not None else 0)
    return decoder + encoder


def auto_class_name(family: str) -> str:
    return "AutoModelForSeq2SeqLM" if family == SEQ2SEQ else "AutoModelForCausalLM"


def default_lora_targets(family: str, model_type_name: str = "?",
                         linear_names: Iterable[str] | None = None) -> list[str] | None:
    """The usual LoRA targets. With the model's linear module names: the first candidate they all
    contain (None when none fits: the caller asks for TARGET_MODULES or "all-linear"). Without
    them (planning from a config alone): by model type, else the family's first candidate."""
    candidates = LORA_TARGETS[family]
    if linear_names is not None:
        names = set(linear_names)
        return next((list(c) for c in candidates if set(c) <= names), None)
    return list(_BY_MODEL_TYPE.get(model_type_name, candidates[0]))
