"""How big a model really is: its shape from its config, else from the benchmark ranking's columns.

From a config (local folder, Hub or cache) the model is built on the `meta` device, which
allocates nothing, and measured with finetuneflow.plan.model_facts (the same functions the
benchmark uses on the loaded model). When the config cannot be loaded (offline, gated Hub model)
the ranking's columns stand in: `parameters`, `hidden_size`, `encoder_layers`, `decoder_layers`,
`vocab_size`, `model_type`, `max_positions`, `quantizable_parameters`; a ranking without
`quantizable_parameters` takes the 16-bit part as 2*V*h (input embedding and an untied output
head: conservative); other missing columns are guessed (see shape_from_row) and the plan says so.

Default LoRA targets come from finetuneflow.contract.architectures, the table the trainer uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from finetuneflow.contract import architectures as arch
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.plan.model_facts import architecture_columns, linear_layers

ALL_LINEAR = "all-linear"


@dataclass
class ModelShape:
    """What the memory formula needs to know about a model."""
    parameters: int
    quantizable: int              # parameters in Linear layers except the output head
    hidden_size: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    family: str                   # "seq2seq" or "causal"
    model_type: str
    max_positions: int | None
    lora_dims: dict = field(default_factory=dict)   # layer name -> sum(in + out) over its Linear layers
    source: str = "config"        # "config" or "ranking" (+ what was guessed)

    def lora_parameters(self, targets: list[str], r: int) -> int:
        if targets == [ALL_LINEAR]:
            return r * sum(self.lora_dims.values())
        return r * sum(self.lora_dims.get(t, 0) for t in targets)


def build_on_meta(config):
    """The model of `config` with no memory behind its weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    auto = AutoModelForSeq2SeqLM if arch.family_name(config) == arch.SEQ2SEQ else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def shape_from_config(config) -> ModelShape:
    """Build the model on the meta device and measure it."""
    model = build_on_meta(config)
    quantizable, dims = linear_layers(model)
    facts = architecture_columns(config)
    return ModelShape(sum(p.numel() for p in model.parameters()), quantizable, facts["hidden_size"] or 0,
                      facts["encoder_layers"], facts["decoder_layers"] or 0, facts["vocab_size"] or 0,
                      facts["family"], facts["model_type"], facts["max_positions"], dims, "config")


MAX_CELL = 1e15   # no model column (parameters, sizes, samples/s) is this big; a bigger number is garbage


def number(row: dict, key: str) -> float | None:
    """A positive finite number from a ranking cell; None for anything else (empty, text, nan, <= 0,
    absurdly large)."""
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) and 0 < value <= MAX_CELL else None


def _row_lora_dims(family: str, encoder: float, decoder: float, hidden: float) -> dict:
    """Per target, sum(in + out) over the attention layers of a standard transformer: one set per
    encoder and decoder layer (seq2seq decoders have two attention blocks); fused q/k/v layers
    (qkv_proj, c_attn, query_key_value) take h in and give 3h out."""
    blocks = encoder + 2 * decoder if family == arch.SEQ2SEQ else decoder
    fused = ("qkv_proj", "c_attn", "query_key_value")
    names = {name for candidates in arch.LORA_TARGETS.values() for choice in candidates for name in choice}
    return {t: int(blocks * hidden * (4 if t in fused else 2)) for t in sorted(names)}


def shape_from_row(row: dict) -> ModelShape:
    """A shape from the ranking's columns; missing architecture columns are guessed and said so:
    a decoder-only shape with P = 12*L*h^2 and h/L = 128 (Llama-like), vocabulary 50,000."""
    params = number(row, "parameters")
    if not params:
        raise UserError(f"model {row.get('model')!r}: its config cannot be loaded and the ranking has no "
                        f"parameter count; re-run benchmark_models.py for it, or add a 'parameters' column")
    guessed = []
    hidden = number(row, "hidden_size")
    if not hidden:
        hidden = 64 * max(1, round((128 * params / 12) ** (1 / 3) / 64))
        guessed.append("hidden_size")
    encoder, decoder = number(row, "encoder_layers") or 0, number(row, "decoder_layers")
    if not decoder:
        decoder = max(1, round(hidden / 128))
        guessed.append("layers")
    vocab = number(row, "vocab_size")
    if not vocab:
        vocab = 50_000
        guessed.append("vocab_size")
    family = str(row.get("family") or "").strip()
    family = family if family in (arch.SEQ2SEQ, arch.CAUSAL) else (arch.SEQ2SEQ if encoder else arch.CAUSAL)
    quantizable = number(row, "quantizable_parameters")   # measured by the benchmark
    if not quantizable:   # input embedding + an untied output head stay 16-bit: conservative
        quantizable = params - min(0.5 * params, 2 * vocab * hidden)
    positions = number(row, "max_positions")
    source = "ranking" + (f" (guessed: {', '.join(guessed)})" if guessed else "")
    return ModelShape(int(params), int(min(quantizable, params)), int(hidden), int(encoder), int(decoder), int(vocab),
                      family, str(row.get("model_type") or "").strip(), int(positions) if positions else None,
                      _row_lora_dims(family, encoder, decoder, hidden), source)


def default_targets(shape: ModelShape) -> list[str]:
    """The LoRA targets the trainer picks by default (contract.architectures' one table): from the
    model's real layer names when the config was loaded, else by model type; "all-linear" when the
    table has none for the model (the trainer then needs TARGET_MODULES, and the plan passes it)."""
    if shape.source == "config":
        return arch.default_lora_targets(shape.family, shape.model_type, shape.lora_dims) or [ALL_LINEAR]
    return arch.default_lora_targets(shape.family, shape.model_type)


def shape_for(row: dict, trust_remote_code: bool = False) -> tuple[ModelShape, str]:
    """The model's shape from its config (local folder, Hub or cache), else from the ranking row,
    and a note saying which."""
    from finetuneflow.model.loading import load_config
    source = str(row.get("source") or row.get("entry") or row["model"])
    try:
        return shape_from_config(load_config(source, trust_remote_code)), f"model config ({source})"
    except Exception as exc:   # offline, gated, unknown architecture: the ranking's measured columns stand in
        shape = shape_from_row(row)
        return shape, f"{shape.source} columns, because the config cannot be loaded ({first_line(exc, 120)})"
